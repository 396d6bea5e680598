"""Per-app token bucket rate limiting for event intake.

Each app has a bucket holding up to `burst` tokens that refills at `rate` tokens per second;
an event costs `cost` tokens. The answer carries what HTTP needs for a 429 with Retry-After
and the X-RateLimit-Limit / -Remaining / -Reset headers.
"""

from __future__ import annotations

import math
import time

__all__ = ["Decision", "RateLimiter", "UNLIMITED"]


class Decision:
    """The outcome of one `RateLimiter.check`.

    allowed: the event may pass. limit: the bucket size (burst); 0 when unlimited.
    remaining: whole tokens left after this check. reset: seconds until the bucket is full
    again (allowed) or until enough tokens for this cost have refilled (refused).
    retry_after: whole seconds to wait, >= 1 when refused, 0 when allowed.

    The limiter reuses one Decision per app (no allocation on the hot path), so a Decision
    is only valid until the next check for the same app; use `copy()` to keep one.
    """

    __slots__ = ("allowed", "limit", "remaining", "reset", "retry_after")

    def __init__(self, allowed: bool = True, limit: int = 0, remaining: int = 0,
                 reset: float = 0.0, retry_after: int = 0) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset = reset
        self.retry_after = retry_after

    def copy(self) -> Decision:
        return Decision(self.allowed, self.limit, self.remaining, self.reset, self.retry_after)

    def headers(self) -> dict[str, str]:
        """HTTP headers for this decision (none when unlimited)."""
        if self.limit == 0:
            return {}
        out = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset)),
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out

    def __repr__(self) -> str:
        return (f"Decision(allowed={self.allowed}, limit={self.limit}, "
                f"remaining={self.remaining}, reset={self.reset:.3f}, "
                f"retry_after={self.retry_after})")


# Shared answer for rate <= 0; callers must treat it as read-only.
UNLIMITED = Decision(True, 0, 0, 0.0, 0)


class _Bucket:
    __slots__ = ("tokens", "last", "decision")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last
        self.decision = Decision()


class RateLimiter:
    """Token buckets keyed by app id. Not thread-safe: use it from the event loop thread.

    Time comes from `time.monotonic()` unless `now` is given, so wall clock jumps don't
    refill or drain buckets.
    """

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def check(self, app_id: str, rate: float, burst: int, cost: int = 1,
              now: float | None = None) -> Decision:
        if rate <= 0:
            return UNLIMITED
        if now is None:
            now = time.monotonic()
        if burst < 1:
            burst = 1  # a zero bucket could never admit anything, which "rate > 0" contradicts
        b = self._buckets.get(app_id)
        if b is None:
            b = self._buckets[app_id] = _Bucket(float(burst), now)
            tokens = float(burst)
        else:
            elapsed = now - b.last
            tokens = b.tokens
            if elapsed > 0:
                tokens += elapsed * rate
            if tokens > burst:  # also clamps after the app's burst was lowered
                tokens = float(burst)
        b.last = now if now > b.last else b.last
        d = b.decision
        d.limit = burst
        if tokens >= cost:
            tokens -= cost
            b.tokens = tokens
            d.allowed = True
            d.remaining = int(tokens)
            d.reset = (burst - tokens) / rate
            d.retry_after = 0
        else:
            b.tokens = tokens
            # A cost above burst can never pass; the answer still says when the bucket is full.
            wait = (min(cost, burst) - tokens) / rate
            d.allowed = False
            d.remaining = int(tokens)
            d.reset = wait
            d.retry_after = max(1, math.ceil(wait))
        return d

    def forget(self, app_id: str) -> None:
        """Drops an app's bucket (app removed or its limits reset)."""
        self._buckets.pop(app_id, None)

    def __len__(self) -> int:
        return len(self._buckets)
