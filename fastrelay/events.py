"""The accepted event: what intake produces, the audit stores and the bus carries."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_lock = threading.Lock()
_last_ms = 0
_seq = 0
_node_bits = int.from_bytes(os.urandom(5), "big")

_ALPHABET = "0123456789abcdefghijklmnopqrstuv"  # base32hex keeps lexical order = numeric order


def new_event_id(now_ms: int | None = None) -> str:
    """A time-ordered unique id: 48-bit ms time, 20-bit sequence, 40 random bits per process.

    Sorting ids as strings sorts them by acceptance time, which the audit's pagination uses.
    """
    global _last_ms, _seq
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _seq += 1
            if _seq >= 1 << 20:  # more than a million ids in one ms: borrow the next ms
                ms += 1
                _seq = 0
        else:
            _seq = 0
        _last_ms = ms
        value = (ms << 60) | (_seq << 40) | _node_bits
    out = []
    for _ in range(22):  # 108 bits -> 22 base32 digits
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


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
