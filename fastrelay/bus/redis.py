"""The Redis bus: every worker and host subscribes to one channel under the deployment's key
prefix. A publisher delivers to its own subscribers itself (right after the publishing
callback, Node.deliver_soon) and sends the event to the others; each message names its
origin, so no node delivers an event twice.

Messages are batched (one PUBLISH per loop turn carries every event published meanwhile)
and carry a blake3 keyed MAC made with the cluster secret: a forged or corrupted message is
dropped and counted. When Redis goes away, local traffic goes on; the bus reconnects with
back-off, resubscribes, and asks the node to resynchronise its cluster state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import blake3
import orjson

from ..events import Event
from ..logs import redact_url
from ..redisconn import connect as connect_redis
from ..redisconn import key_prefix
from ..redisconn import parse as parse_url

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("fastrelay.bus")

MAC_SIZE = 16
MAX_PENDING = 100_000  # events kept for other nodes while Redis is away


def mac_key(secret: bytes) -> bytes:
    return blake3.blake3(secret, derive_key_context="fastrelay bus v1").digest()


def encode_event(ev: Event) -> list[Any]:
    return [ev.id, ev.app_id, ev.channels, ev.name, ev.data, ev.socket_id, ev.source,
            ev.accepted_at, ev.user_id]


def decode_event(row: list[Any]) -> Event:
    return Event(id=row[0], app_id=row[1], channels=row[2], name=row[3], data=row[4],
                 socket_id=row[5], source=row[6], accepted_at=row[7], user_id=row[8])


class RedisBus:
    def __init__(self, redis_url: str, secret: bytes, prefix: str) -> None:
        self.url = redis_url
        self.target = parse_url(redis_url)
        self.sharded = self.target.sharded  # Redis Cluster: SPUBLISH/SSUBSCRIBE
        self.channel = f"{key_prefix(prefix, self.target)}:bus"
        self.key = mac_key(secret)
        self.node_id = os.urandom(8).hex()
        self._node: Node | None = None
        self._pending: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._handlers: dict[str, Callable[[dict], None]] = {}
        self.redis: Any = None
        self.connected = asyncio.Event()
        self.on_reconnect: list[Callable[[], Any]] = []
        # counters for /metrics
        self.published = 0
        self.received = 0
        self.forged = 0
        self.reconnects = 0
        self.dropped = 0
        self.lag = 0.0  # seconds from publish to receipt of the last remote message

    # ------------------------------------------------------------------ Bus interface

    async def start(self, node: Node) -> None:
        self._node = node
        self.redis = self._client()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._publisher()), loop.create_task(self._subscriber())]
        try:
            await asyncio.wait_for(self.connected.wait(), 5)
        except TimeoutError:
            log.warning("redis is not reachable yet; serving local traffic",
                        extra={"url": redact_url(self.url)})

    def publish(self, event: Event) -> None:
        if self._node is not None:
            self._node.deliver_soon(event)
        self.send("ev", encode_event(event))

    def send(self, kind: str, body: Any) -> None:
        """Sends a control message (or events) to every other node."""
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(orjson.dumps([kind, body]))
        self._wake.set()

    def on(self, kind: str, handler: Callable[[dict], None]) -> None:
        self._handlers[kind] = handler

    async def close(self) -> None:
        # give queued messages a moment to leave
        deadline = time.monotonic() + 1.0
        while self._pending and self.connected.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.redis is not None:
            await self.redis.aclose()
        self._node = None

    # ------------------------------------------------------------------ internals

    def _client(self) -> Any:
        return connect_redis(self.url)[0]

    def _seal(self, items: list[bytes]) -> bytes:
        # ["origin", sent_at, [items...]]: items are already JSON, so join instead of re-encoding
        body = b'["%s",%r,[%s]]' % (self.node_id.encode(), time.time(), b",".join(items))
        return blake3.blake3(body, key=self.key).digest(MAC_SIZE) + body

    async def _publisher(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                n = min(len(self._pending), 1000)
                items = [self._pending[i] for i in range(n)]
                try:
                    if self.sharded:
                        await self.redis.spublish(self.channel, self._seal(items))
                    else:
                        await self.redis.publish(self.channel, self._seal(items))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("bus publish failed; retrying", extra={"error": str(e)[:200]})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                for _ in range(n):
                    self._pending.popleft()
                self.published += n

    async def _subscriber(self) -> None:
        backoff = 0.1
        first = True
        pubsub: Any = None
        while True:
            try:
                if self.sharded:
                    await self.redis.initialize()  # the slot map tells which shard to ask
                pubsub = self.redis.pubsub()
                if self.sharded:
                    await pubsub.ssubscribe(self.channel)
                else:
                    await pubsub.subscribe(self.channel)
                self.connected.set()
                if not first:
                    self.reconnects += 1
                    log.info("bus reconnected", extra={"url": redact_url(self.url)})
                    for cb in self.on_reconnect:
                        res = cb()
                        if asyncio.iscoroutine(res):
                            asyncio.get_running_loop().create_task(res)
                first = False
                backoff = 0.1
                self._wake.set()  # flush what queued while away
                while True:
                    if self.sharded:
                        msg = await pubsub.get_sharded_message(ignore_subscribe_messages=True,
                                                               timeout=5.0)
                    else:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is not None and msg["type"] in ("message", "smessage"):
                        self._receive(msg["data"])
            except asyncio.CancelledError:
                if pubsub is not None:
                    await pubsub.aclose()
                raise
            except Exception as e:
                self.connected.clear()
                log.warning("bus connection lost; reconnecting", extra={"error": str(e)[:200]})
                try:
                    if pubsub is not None:
                        await pubsub.aclose()
                except Exception:
                    pass
                pubsub = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _receive(self, raw: bytes) -> None:
        mac, body = raw[:MAC_SIZE], raw[MAC_SIZE:]
        if len(raw) <= MAC_SIZE or blake3.blake3(body, key=self.key).digest(MAC_SIZE) != mac:
            self.forged += 1
            return
        try:
            origin, sent_at, items = orjson.loads(body)
        except (orjson.JSONDecodeError, ValueError):
            self.forged += 1
            return
        if origin == self.node_id:
            return  # delivered locally when published
        self.received += len(items)
        self.lag = max(0.0, time.time() - sent_at)
        node = self._node
        if node is None:
            return
        for kind, payload in items:
            try:
                if kind == "ev":
                    node.deliver(decode_event(payload))
                else:
                    handler = self._handlers.get(kind)
                    if handler is not None:
                        handler(payload)
            except Exception:
                log.exception("bus message failed", extra={"kind": kind})
