"""Token bucket behaviour with explicit clocks (no sleeps)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fastrelay.ratelimit import UNLIMITED, RateLimiter


def test_burst_then_refused_with_retry_after() -> None:
    rl = RateLimiter()
    for i in range(5):
        d = rl.check("a", rate=1.0, burst=5, now=100.0)
        assert d.allowed and d.limit == 5 and d.remaining == 4 - i
    d = rl.check("a", rate=1.0, burst=5, now=100.0)
    assert not d.allowed
    assert d.remaining == 0
    assert d.retry_after == 1
    assert d.reset == 1.0
    h = d.headers()
    assert h["Retry-After"] == "1" and h["X-RateLimit-Limit"] == "5"
    assert h["X-RateLimit-Remaining"] == "0"


def test_refill_over_time() -> None:
    rl = RateLimiter()
    for _ in range(10):
        rl.check("a", rate=10.0, burst=10, now=0.0)
    assert not rl.check("a", 10.0, 10, now=0.0).allowed
    assert not rl.check("a", 10.0, 10, now=0.05).allowed  # half a token
    d = rl.check("a", 10.0, 10, now=0.1)
    assert d.allowed and d.remaining == 0
    d = rl.check("a", 10.0, 10, now=100.0)  # long idle: capped at burst
    assert d.allowed and d.remaining == 9
    assert abs(d.reset - 0.1) < 1e-9


def test_slow_rate_retry_after_rounds_up() -> None:
    rl = RateLimiter()
    assert rl.check("a", rate=0.1, burst=1, now=0.0).allowed
    d = rl.check("a", rate=0.1, burst=1, now=1.0)
    assert not d.allowed
    assert abs(d.reset - 9.0) < 1e-9
    assert d.retry_after == 9
    assert rl.check("a", rate=0.1, burst=1, now=10.0).allowed


def test_apps_are_independent() -> None:
    rl = RateLimiter()
    assert rl.check("a", 1, 1, now=0).allowed
    assert not rl.check("a", 1, 1, now=0).allowed
    assert rl.check("b", 1, 1, now=0).allowed
    assert len(rl) == 2
    rl.forget("a")
    assert rl.check("a", 1, 1, now=0).allowed


def test_unlimited() -> None:
    rl = RateLimiter()
    for _ in range(1000):
        d = rl.check("a", rate=0, burst=0, now=0)
        assert d is UNLIMITED and d.allowed
    assert d.headers() == {}
    assert rl.check("a", rate=-1, burst=5).allowed
    assert len(rl) == 0


def test_cost_and_cost_above_burst() -> None:
    rl = RateLimiter()
    d = rl.check("a", rate=1, burst=10, cost=4, now=0)
    assert d.allowed and d.remaining == 6
    d = rl.check("a", rate=1, burst=10, cost=7, now=0)
    assert not d.allowed and d.retry_after == 1 and d.remaining == 6  # refusal costs nothing
    d = rl.check("a", rate=1, burst=10, cost=50, now=0)
    assert not d.allowed and d.retry_after >= 1


def test_decision_is_reused_per_app_and_copy_keeps_it() -> None:
    rl = RateLimiter()
    d1 = rl.check("a", 1, 2, now=0)
    kept = d1.copy()
    d2 = rl.check("a", 1, 2, now=0)
    assert d1 is d2  # no allocation on the hot path
    assert kept.remaining == 1 and d2.remaining == 0


def test_clock_going_backwards_does_not_refill() -> None:
    rl = RateLimiter()
    assert rl.check("a", 1, 1, now=10).allowed
    assert not rl.check("a", 1, 1, now=5).allowed
    assert not rl.check("a", 1, 1, now=10.5).allowed
    assert rl.check("a", 1, 1, now=11).allowed


def test_burst_lowered_clamps_tokens() -> None:
    rl = RateLimiter()
    rl.check("a", 1, 100, now=0)
    d = rl.check("a", 1, 3, now=0)
    assert d.allowed and d.remaining == 2 and d.limit == 3


@given(
    rate=st.floats(min_value=0.5, max_value=1000),
    burst=st.integers(min_value=1, max_value=200),
    steps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=200),
)
def test_never_admits_more_than_burst_plus_refill(rate: float, burst: int,
                                                   steps: list[float]) -> None:
    rl = RateLimiter()
    now = 0.0
    admitted = 0
    for dt in steps:
        now += dt
        d = rl.check("a", rate, burst, now=now)
        admitted += d.allowed
        assert 0 <= d.remaining <= burst
        assert d.allowed or d.retry_after >= 1
    assert admitted <= burst + rate * now + 1e-6
