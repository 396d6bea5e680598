"""The in-process bus: one worker is the whole cluster, so publishing is delivering."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..events import Event
    from ..node import Node


class LocalBus:
    def __init__(self) -> None:
        self.publish: Callable[[Event], None] = _dropped

    async def start(self, node: Node) -> None:
        # the compiled Node.deliver_soon, bound: publishing runs no Python frame
        self.publish = node.deliver_soon

    async def close(self) -> None:
        self.publish = _dropped


def _dropped(event: Event) -> None:
    """Publishing before start or after close: nothing is delivered."""
