"""Channel kinds and names, and the worker's channel table (app + name -> Channel)."""

from __future__ import annotations

from ._core import Channel, name_chars_ok

# kind bits
PRIVATE = 1  # needs a signed auth
PRESENCE = 2
ENCRYPTED = 4
CACHE = 8
USER = 16  # #server-to-user-{id}: only that signed-in user

MAX_NAME = 200
USER_PREFIX = "#server-to-user-"

_PREFIXES = (
    ("private-encrypted-cache-", PRIVATE | ENCRYPTED | CACHE),
    ("private-encrypted-", PRIVATE | ENCRYPTED),
    ("private-cache-", PRIVATE | CACHE),
    ("private-", PRIVATE),
    ("presence-cache-", PRIVATE | PRESENCE | CACHE),
    ("presence-", PRIVATE | PRESENCE),
    ("cache-", CACHE),
)


def kind_of(name: str) -> int:
    if name[:1] not in ("p", "c", "#"):
        return 0  # most channels are public: skip the prefix walk
    for prefix, kind in _PREFIXES:
        if name.startswith(prefix):
            return kind
    if name.startswith(USER_PREFIX):
        return USER
    return 0


def name_error(name: object) -> str | None:
    """Why a channel name is invalid, or None."""
    if not isinstance(name, str) or not name:
        return "channel name is missing"
    if len(name) > MAX_NAME:
        return f"channel name is longer than {MAX_NAME} characters"
    if name.startswith(USER_PREFIX):
        return None if name_chars_ok(name[len(USER_PREFIX):]) else "invalid user channel name"
    if not name_chars_ok(name):
        return "channel name may only contain A-Z a-z 0-9 _ - = @ , . ;"
    return None


class ChannelTable:
    """The channels that have local subscribers, per app. A channel exists while occupied."""

    __slots__ = ("_channels",)

    def __init__(self) -> None:
        self._channels: dict[tuple[str, str], Channel] = {}

    def get(self, app_id: str, name: str) -> Channel | None:
        return self._channels.get((app_id, name))

    def get_or_create(self, app_id: str, name: str) -> tuple[Channel, bool]:
        ch = self._channels.get((app_id, name))
        if ch is not None:
            return ch, False
        ch = Channel(app_id, name, kind_of(name))
        self._channels[(app_id, name)] = ch
        return ch, True

    def remove_if_empty(self, ch: Channel) -> bool:
        if ch.members:
            return False
        self._channels.pop((ch.app_id, ch.name), None)
        return True

    def of_app(self, app_id: str) -> list[Channel]:
        return [ch for (a, _), ch in self._channels.items() if a == app_id]

    def __len__(self) -> int:
        return len(self._channels)
