"""The in-process bus: one worker is the whole cluster, so publishing is delivering."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..events import Event
    from ..node import Node


class LocalBus:
    def __init__(self) -> None:
        self._node: Node | None = None

    async def start(self, node: Node) -> None:
        self._node = node

    def publish(self, event: Event) -> None:
        if self._node is not None:
            self._node.deliver_soon(event)

    async def close(self) -> None:
        self._node = None
