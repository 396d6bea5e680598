"""Channel kinds and names, and the worker's channel table (app + name -> Channel)."""

from __future__ import annotations

# The kind bits and the name checks live in the core, where the trigger's checks run.
from ._core import (
    CACHE,
    ENCRYPTED,
    MAX_CHANNEL_NAME,
    PRESENCE,
    PRIVATE,
    USER,
    USER_PREFIX,
    Channel,
)
from ._core import channel_kind as kind_of
from ._core import channel_name_error as name_error

__all__ = ["CACHE", "ENCRYPTED", "MAX_CHANNEL_NAME", "PRESENCE", "PRIVATE", "USER", "USER_PREFIX",
           "ChannelTable", "kind_of", "name_error"]


class ChannelTable:
    """The channels that have local subscribers, per app. A channel exists while occupied."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], Channel] = {}  # fan-out reads it from C

    def get(self, app_id: str, name: str) -> Channel | None:
        return self.entries.get((app_id, name))

    def get_or_create(self, app_id: str, name: str) -> tuple[Channel, bool]:
        ch = self.entries.get((app_id, name))
        if ch is not None:
            return ch, False
        ch = Channel(app_id, name, kind_of(name))
        self.entries[(app_id, name)] = ch
        return ch, True

    def remove_if_empty(self, ch: Channel) -> bool:
        if ch.members:
            return False
        self.entries.pop((ch.app_id, ch.name), None)
        return True

    def of_app(self, app_id: str) -> list[Channel]:
        return [ch for (a, _), ch in self.entries.items() if a == app_id]

    def __len__(self) -> int:
        return len(self.entries)
