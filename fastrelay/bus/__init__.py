"""The bus carries accepted events to every worker and host. One interface, two brokers:
in-process (one worker, no Redis) and Redis (several workers or hosts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .local import LocalBus

if TYPE_CHECKING:
    from ..events import Event
    from ..node import Node

__all__ = ["Bus", "LocalBus"]


class Bus(Protocol):
    async def start(self, node: Node) -> None:
        """Connects and begins delivering remote events to node.deliver."""

    def publish(self, event: Event) -> None:
        """Delivers locally right after the current callback (Node.deliver_soon), and to every
        other node exactly once."""

    async def close(self) -> None:
        """Stops; events already published locally have been delivered."""
