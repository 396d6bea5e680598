"""Idempotency stores: in memory and on the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from fastrelay.idempotency import (
    IdempotencyStore,
    RedisIdempotencyStore,
    idempotency_digest,
)

SECRET = b"s" * 32


def test_first_claim_then_original_answer() -> None:
    s = IdempotencyStore(SECRET)
    assert s.claim("app", "k1", b'{"id":"1"}', now=0) is None
    assert s.claim("app", "k1", b'{"id":"2"}', now=10) == b'{"id":"1"}'
    assert s.hits == 1


def test_keys_are_per_app() -> None:
    s = IdempotencyStore(SECRET)
    assert s.claim("app1", "k", b"a", now=0) is None
    assert s.claim("app2", "k", b"b", now=0) is None
    # "\0" separates app and key, so these differ too
    assert s.claim("ap", "p1\0k", b"c", now=0) is None
    assert s.claim("app1", "k", b"x", now=0) == b"a"


def test_ttl_expiry() -> None:
    s = IdempotencyStore(SECRET, ttl=86_400)
    assert s.claim("a", "k", b"1", now=0) is None
    assert s.claim("a", "k", b"2", now=86_399) == b"1"
    assert s.claim("a", "k", b"3", now=86_400) is None
    assert s.claim("a", "k", b"4", now=86_401) == b"3"


def test_expired_entries_are_dropped() -> None:
    s = IdempotencyStore(SECRET, ttl=10)
    for i in range(100):
        s.claim("a", str(i), b"r", now=i * 0.01)
    assert len(s) == 100
    s.claim("a", "late", b"r", now=100)
    assert len(s) == 1


def test_size_bound_evicts_oldest() -> None:
    s = IdempotencyStore(SECRET, max_entries=3)
    for k in "abcd":
        assert s.claim("app", k, k.encode(), now=0) is None
    assert len(s) == 3 and s.evicted == 1
    assert s.claim("app", "a", b"new", now=0) is None  # evicted, so claimable again
    assert s.claim("app", "d", b"x", now=0) == b"d"


def test_release_allows_retry() -> None:
    s = IdempotencyStore(SECRET)
    assert s.claim("a", "k", b"1", now=0) is None
    s.release("a", "k")
    assert s.claim("a", "k", b"2", now=0) is None


def test_digest_is_keyed_16_bytes() -> None:
    d1 = idempotency_digest(SECRET, "a", "k")
    d2 = idempotency_digest(b"t" * 32, "a", "k")
    assert len(d1) == 16 and d1 != d2
    # short secrets are stretched by the BLAKE3 KDF rather than rejected
    s = IdempotencyStore(b"short")
    assert len(s.digest("a", "k")) == 16
    with pytest.raises(ValueError):
        IdempotencyStore(b"")


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisIdempotencyStore]:
    r = Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = "fastrelay-test-" + os.urandom(6).hex()
    store = RedisIdempotencyStore(r, SECRET, prefix=prefix)
    yield store
    keys = [k async for k in r.scan_iter(match=prefix + ":*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


async def test_redis_claim_and_conflict(redis_store: RedisIdempotencyStore) -> None:
    assert await redis_store.claim("app", "k", b'{"id":"1"}') is None
    assert await redis_store.claim("app", "k", b'{"id":"2"}') == b'{"id":"1"}'
    assert await redis_store.claim("other", "k", b"x") is None
    rkey = redis_store.redis_key("app", "k")
    assert rkey.split(":idem:")[1] == idempotency_digest(SECRET, "app", "k").hex()
    ttl = await redis_store._redis.ttl(rkey)
    assert 86_000 < ttl <= 86_400


async def test_redis_release_and_expiry(redis_store: RedisIdempotencyStore) -> None:
    assert await redis_store.claim("app", "k", b"1") is None
    await redis_store.release("app", "k")
    assert await redis_store.claim("app", "k", b"2") is None
    # an expired claim is claimable again
    await redis_store._redis.delete(redis_store.redis_key("app", "k"))
    assert await redis_store.claim("app", "k", b"3") is None
    assert await redis_store.claim("app", "k", b"4") == b"3"


async def test_redis_concurrent_claims_one_winner(redis_store: RedisIdempotencyStore) -> None:
    import asyncio

    results = await asyncio.gather(
        *(redis_store.claim("app", "race", str(i).encode()) for i in range(20))
    )
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(r == str(winners[0]).encode() for r in results if r is not None)
