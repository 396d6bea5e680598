"""The accepted event: what intake produces, the audit stores and the bus carries."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

_last_ms = 0
_seq = 0
_node = ""


def _new_node() -> None:
    # 40 random bits per process, drawn again in each forked worker so workers never collide
    global _node
    _node = os.urandom(5).hex()


_new_node()
os.register_at_fork(after_in_child=_new_node)


def new_event_id(now_ms: int | None = None) -> str:
    """A time-ordered unique id: 12 hex digits of ms time, 5 of sequence, 10 random per process.

    Fixed-width hex, so sorting ids as strings sorts them by acceptance time (the audit pages
    by id). Called on the event loop's thread only.
    """
    global _last_ms, _seq
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    if ms <= _last_ms:
        ms = _last_ms
        _seq += 1
        if _seq >= 1 << 20:  # more than a million ids in one ms: borrow the next ms
            ms += 1
            _seq = 0
    else:
        _seq = 0
    _last_ms = ms
    return f"{ms:012x}{_seq:05x}{_node}"


@dataclass(slots=True)
class Event:
    """One accepted event, fanned out to each of its channels.

    `data` is the value carried in the Pusher frame's "data" field: a string for server events
    (the HTTP API sends JSON as a string), any JSON value for client events (relayed as sent).
    """

    app_id: str
    channels: list[str]
    name: str
    data: Any
    socket_id: str | None = None
    source: str = "api"  # api | intake | client | replay
    id: str = field(default_factory=new_event_id)
    accepted_at: float = field(default_factory=time.time)
    user_id: str | None = None  # client events on presence channels carry the sender's id
