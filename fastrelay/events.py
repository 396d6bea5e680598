"""The accepted event: what intake produces, the audit stores and the bus carries.

`Event` is a compiled class (see `_core.Event` for its fields): one is made per accepted
event on the trigger's hot path, and a dataclass's __init__ with default factories cost
about 1 us of a request.
"""

from __future__ import annotations

import os

from ._core import Event, reseed_event_ids

# ids come from the core (ms time, sequence, 40 random bits per process); the random part is
# drawn again in each forked worker so workers never collide
os.register_at_fork(after_in_child=reseed_event_ids)

__all__ = ["Event"]
