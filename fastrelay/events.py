"""The accepted event: what intake produces, the audit stores and the bus carries."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ._core import new_event_id, reseed_event_ids

# ids come from the core (new_event_id: ms time, sequence, 40 random bits per process); the
# random part is drawn again in each forked worker so workers never collide
os.register_at_fork(after_in_child=reseed_event_ids)


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
