"""Idempotency keys for event intake.

A request carrying an `idempotency_key` already seen for the same app within the TTL gets the
original answer back (the stored 202 body); the event is neither broadcast nor stored again.

Keys are stored as a 16-byte BLAKE3 keyed hash of app_id + "\\0" + idempotency_key, so raw
client keys are never kept and apps cannot collide with each other. The hash key is a
per-deployment secret: nodes of one cluster must share it to agree on keys in Redis.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from blake3 import blake3

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["DEFAULT_TTL", "IdempotencyStore", "RedisIdempotencyStore", "idempotency_digest"]

DEFAULT_TTL = 86_400  # seconds: 24 h
_KDF_CONTEXT = "fastrelay 2024 idempotency key v1"


def _hash_key(secret: bytes) -> bytes:
    """BLAKE3 keyed mode needs exactly 32 bytes; other secrets go through its KDF mode."""
    if len(secret) == 32:
        return secret
    if not secret:
        raise ValueError("idempotency secret must not be empty")
    return blake3(secret, derive_key_context=_KDF_CONTEXT).digest()


def idempotency_digest(hash_key: bytes, app_id: str, key: str) -> bytes:
    """The 16-byte stored key; `hash_key` is a 32-byte key (see `_hash_key`)."""
    return blake3(
        app_id.encode("utf-8", "surrogatepass") + b"\0" + key.encode("utf-8", "surrogatepass"),
        key=hash_key,
    ).digest(length=16)


class IdempotencyStore:
    """In-memory store with TTL expiry and a size bound (the oldest claims are evicted first).

    Entries sit in insertion order, which is expiry order with a constant TTL, so expiring is
    popping from the front: amortised O(1) per claim. Not thread-safe (event loop only).
    """

    def __init__(self, secret: bytes, *, ttl: float = DEFAULT_TTL,
                 max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._key = _hash_key(secret)
        self.ttl = ttl
        self.max_entries = max_entries
        # digest -> (expires_at, response)
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self.hits = 0
        self.evicted = 0

    def digest(self, app_id: str, key: str) -> bytes:
        return idempotency_digest(self._key, app_id, key)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            first = next(iter(entries.values()))
            if first[0] > now:
                return
            entries.popitem(last=False)

    def claim(self, app_id: str, key: str, response: bytes,
              now: float | None = None) -> bytes | None:
        """None: first use, `response` is now stored for the key. bytes: the earlier response."""
        if now is None:
            now = time.time()
        self._expire(now)
        d = self.digest(app_id, key)
        entries = self._entries
        hit = entries.get(d)
        if hit is not None:
            if hit[0] > now:
                self.hits += 1
                return hit[1]
            del entries[d]  # out of order expiry (a `now` that went backwards earlier)
        while len(entries) >= self.max_entries:
            entries.popitem(last=False)
            self.evicted += 1
        entries[d] = (now + self.ttl, response)
        return None

    def release(self, app_id: str, key: str) -> None:
        """Forgets a claim whose event was refused after all (e.g. 503), so a retry may pass."""
        self._entries.pop(self.digest(app_id, key), None)

    def __len__(self) -> int:
        return len(self._entries)


class RedisIdempotencyStore:
    """Cluster-wide store: `SET <prefix>:idem:<hex> response NX EX ttl`, GET on conflict."""

    def __init__(self, redis: Redis, secret: bytes, *, prefix: str = "fastrelay",
                 ttl: int = DEFAULT_TTL) -> None:
        self._redis = redis
        self._key = _hash_key(secret)
        self._prefix = f"{prefix}:idem:"
        self.ttl = int(ttl)
        self.hits = 0

    def redis_key(self, app_id: str, key: str) -> str:
        return self._prefix + idempotency_digest(self._key, app_id, key).hex()

    async def claim(self, app_id: str, key: str, response: bytes) -> bytes | None:
        """None: first use (claimed). bytes: the response stored by the first claimant."""
        rkey = self.redis_key(app_id, key)
        # Retried: the earlier claim may expire between our SET NX and GET.
        for _ in range(3):
            if await self._redis.set(rkey, response, nx=True, ex=self.ttl):
                return None
            earlier = await self._redis.get(rkey)
            if earlier is not None:
                self.hits += 1
                return bytes(earlier)
        return None  # the key keeps flapping: let this one through rather than fail intake

    async def release(self, app_id: str, key: str) -> None:
        await self._redis.delete(self.redis_key(app_id, key))

    async def aclose(self) -> None:
        await self._redis.aclose()
