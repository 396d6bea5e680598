"""Webhooks: edges recorded on the connection path, delayed and suppressed, claimed once per
cluster, queued in a durable outbox and POSTed in batches by a background sender per endpoint.

    node hook ─O(1)─▶ _ready / _delayed ─flush tick─▶ claim + outbox ─▶ sender per endpoint ─▶ POST
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .._core import hmac_sha256_hex
from ..redisconn import redis_prefix
from .http import HttpClient, HttpError
from .outbox import Edge, Item, Outbox, RedisOutbox, SqliteOutbox

if TYPE_CHECKING:
    from fastrelay.apps import AppManager
    from fastrelay.cluster import Cluster
    from fastrelay.config import Config

log = logging.getLogger("fastrelay.webhooks")

EVENT_TYPES = frozenset({"channel_occupied", "channel_vacated", "member_added", "member_removed",
                         "client_event", "cache_miss", "subscription_count"})
# edges every node may see for the same transition: claimed in Redis so only one sends
CLAIMED = frozenset({"channel_occupied", "channel_vacated", "member_added", "member_removed"})


def endpoint_error(d: Any) -> str | None:
    """What is wrong with one endpoint dict, or None."""
    if not isinstance(d, dict):
        return "each webhook must be a table/object"
    unknown = set(d) - {"url", "event_types", "filter", "headers"}
    if unknown:
        return f"unknown webhook keys {sorted(unknown)}"
    url = d.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return "webhook url must start with http:// or https://"
    types = d.get("event_types", [])
    if not isinstance(types, list) or not set(types) <= EVENT_TYPES:
        return f"webhook event_types must be a list of {sorted(EVENT_TYPES)}"
    f = d.get("filter") or {}
    if not isinstance(f, dict) or set(f) - {"channel_name_starts_with", "channel_name_ends_with"}:
        return "webhook filter takes channel_name_starts_with and channel_name_ends_with"
    if not isinstance(d.get("headers") or {}, dict):
        return "webhook headers must be a table/object"
    return None


class Endpoint:
    __slots__ = ("url", "types", "prefix", "suffix", "headers")

    def __init__(self, d: dict[str, Any]) -> None:
        self.url: str = d["url"]
        self.types = frozenset(d.get("event_types") or EVENT_TYPES)
        f = d.get("filter") or {}
        self.prefix: str = f.get("channel_name_starts_with") or ""
        self.suffix: str = f.get("channel_name_ends_with") or ""
        self.headers = [(str(k), str(v)) for k, v in (d.get("headers") or {}).items()
                        if "\r" not in f"{k}{v}" and "\n" not in f"{k}{v}"]

    def wants(self, kind: str, channel: str) -> bool:
        return (kind in self.types and channel.startswith(self.prefix)
                and channel.endswith(self.suffix))


@dataclass(slots=True)
class WebhookStats:
    """The counters /metrics exports."""

    edges: int = 0  # edges recorded by the hooks
    delivered: int = 0  # events acknowledged by an endpoint (2xx)
    failures: int = 0  # failed POSTs (non-2xx, network, timeout)
    dead: int = 0  # events moved to the dead letters


class _Sender:
    """One endpoint's queue and retry state."""

    __slots__ = ("app_id", "url", "queue", "inflight", "backoff", "retry_at", "last_post",
                 "wake", "task")

    def __init__(self, app_id: str, url: str) -> None:
        self.app_id = app_id
        self.url = url
        self.queue: deque[Item] = deque()
        self.inflight: list[Item] = []
        self.backoff = 0.0
        self.retry_at = 0.0
        self.last_post = 0.0
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


def open_outbox(cfg: Config, redis: Any = None) -> Outbox:
    if redis is not None:
        delay_ms = int(cfg.webhook_delay * 1000)
        worker = os.environ.get("FASTRELAY_WORKER", "0")
        return RedisOutbox(redis, redis_prefix(cfg), f"{socket.gethostname()}:{cfg.port}:{worker}",
                           claim_ttl_ms=max(60_000, 10 * delay_ms),
                           reclaim_idle=cfg.webhook_reclaim_idle)
    return SqliteOutbox(Path(cfg.data_dir) / "webhooks.sqlite3")


class WebhookManager:
    def __init__(self, cfg: Config, apps: AppManager, redis: Any = None, node: Any = None) -> None:
        self.cfg = cfg
        self.node = node  # its cluster state (when clustered) tells node-local edges apart
        self.apps = apps
        self.redis = redis
        self.prefix = redis_prefix(cfg)
        self.delay = max(0.0, cfg.webhook_delay)
        # Claim buckets: half the delay. Two sent edges of one kind on one channel (and user)
        # are always more than `delay` apart (the delay suppresses anything quicker), so they
        # are at least two buckets apart; the same transition seen by two nodes lands in the
        # same or an adjacent bucket, and the claim checks both neighbours.
        self.bucket_ms = max(50, int(self.delay * 500))
        self.flush_interval = max(0.005, cfg.webhook_flush_interval)
        self.outbox: Outbox = open_outbox(cfg, redis)
        self.http = HttpClient(cfg.webhook_timeout)
        self.stats = WebhookStats()
        self._eps: dict[str, tuple[Any, tuple[Endpoint, ...]]] = {}
        self._count_apps: set[str] = set()
        self._ready: list[tuple[str, str, str, str | None, dict | None, int]] = []
        self._delayed: dict[tuple[str, str, str, str | None], tuple[float, int]] = {}
        self._counts: dict[tuple[str, str], Any] = {}
        self._senders: dict[tuple[str, str], _Sender] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ edges (O(1), sync)

    def endpoints(self, app_id: str) -> tuple[Endpoint, ...]:
        app = self.apps.by_id(app_id)
        cached = self._eps.get(app_id)
        if cached is not None and cached[0] is app:
            return cached[1]
        # first use, or the app was replaced (apps refreshed from PostgreSQL)
        eps = tuple(Endpoint(d) for d in app.webhooks)
        self._eps[app_id] = (app, eps)
        if any("subscription_count" in e.types for e in eps):
            self._count_apps.add(app_id)
        else:
            self._count_apps.discard(app_id)
        return eps

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def occupied(self, app_id: str, channel: str) -> None:
        self._came(app_id, "channel_occupied", "channel_vacated", channel, None)

    def vacated(self, app_id: str, channel: str) -> None:
        self._went(app_id, "channel_vacated", channel, None)

    def member_added(self, app_id: str, channel: str, user_id: str) -> None:
        self._came(app_id, "member_added", "member_removed", channel, user_id)

    def member_removed(self, app_id: str, channel: str, user_id: str) -> None:
        self._went(app_id, "member_removed", channel, user_id)

    def _came(self, app_id: str, kind: str, opposite: str, channel: str, user: str | None) -> None:
        if not self.endpoints(app_id):
            return
        self.stats.edges += 1
        if self._delayed.pop((app_id, opposite, channel, user), None) is not None:
            return  # back within the delay: neither edge is sent
        self._ready.append((app_id, kind, channel, user, None, self._now_ms()))

    def _went(self, app_id: str, kind: str, channel: str, user: str | None) -> None:
        if not self.endpoints(app_id):
            return
        self.stats.edges += 1
        if self.delay <= 0:
            self._ready.append((app_id, kind, channel, user, None, self._now_ms()))
        else:
            self._delayed[(app_id, kind, channel, user)] = (time.monotonic() + self.delay,
                                                            self._now_ms())

    def client_event(self, app_id: str, channel: str, event: str, data: Any, socket_id: str | None,
                     user_id: str | None) -> None:
        if not self.endpoints(app_id):
            return
        self.stats.edges += 1
        extra: dict[str, Any] = {"event": event,
                                 "data": data if isinstance(data, str) else orjson.dumps(data).decode(),
                                 "socket_id": socket_id}
        if user_id is not None:
            extra["user_id"] = user_id
        self._ready.append((app_id, "client_event", channel, None, extra, self._now_ms()))

    def cache_miss(self, app_id: str, channel: str) -> None:
        if not self.endpoints(app_id):
            return
        self.stats.edges += 1
        self._ready.append((app_id, "cache_miss", channel, None, None, self._now_ms()))

    def subscription_changed(self, ch: Any) -> None:
        if self.endpoints(ch.app_id) and ch.app_id in self._count_apps:
            self._counts[(ch.app_id, ch.name)] = ch

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.outbox.start(self._deliver)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._flush_loop(), name="webhooks-flush"))
        if isinstance(self.outbox, RedisOutbox):
            self._tasks.append(loop.create_task(self._keep_loop(), name="webhooks-keep"))

    async def close(self, grace: float = 2.0) -> None:
        """Writes every recorded edge (pending delays included) to the outbox, gives the
        senders `grace` seconds, then stops; what is left is delivered after a restart."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._flush(everything=True)
        except Exception:
            log.exception("webhooks: final flush failed")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                (s.queue and s.backoff == 0) or s.inflight for s in self._senders.values()):
            await asyncio.sleep(0.02)
        tasks = [s.task for s in self._senders.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.outbox.close()
        await self.http.close()

    # ------------------------------------------------------------------ edges → outbox

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self._flush()
            except Exception as e:
                log.warning("webhooks: outbox write failed (%r); retrying", e)
                await asyncio.sleep(min(1.0, 10 * self.flush_interval))

    async def _flush(self, everything: bool = False) -> None:
        if self._delayed:
            now = time.monotonic()
            expired = []
            for key, (deadline, _) in self._delayed.items():
                if deadline > now and not everything:
                    break  # one delay for all: insertion order is deadline order
                expired.append(key)
            for key in expired:
                _, t_ms = self._delayed.pop(key)
                self._ready.append((*key, None, t_ms))
        if self._counts:
            counts, self._counts = self._counts, {}
            now_ms = self._now_ms()
            for (app_id, name), ch in counts.items():
                self._ready.append((app_id, "subscription_count", name, None,
                                    {"subscription_count": len(ch.members)}, now_ms))
        if not self._ready:
            return
        ready, self._ready = self._ready, []
        cl = self.node.cluster if self.node is not None and self.redis is not None else None
        edges = []
        for r in ready:
            e = self._edge(*r, cl)
            if e is not None:
                edges.append(e)
        try:
            # occupied/vacated: other nodes count when their heartbeat is this recent
            await self.outbox.add(edges, time.time() - cl.dead_after if cl is not None else 0.0)
        except BaseException:
            self._ready[:0] = ready  # keep them for the next tick
            raise

    def _edge(self, app_id: str, kind: str, channel: str, user: str | None, extra: dict | None,
              t_ms: int, cl: Cluster | None) -> Edge | None:
        ev: dict[str, Any] = {"name": kind, "channel": channel}
        if user is not None:
            ev["user_id"] = user
        if extra:
            ev.update(extra)
        entries = []
        body = None
        for ep in self.endpoints(app_id):
            if ep.wants(kind, channel):
                if body is None:
                    body = orjson.dumps(ev)
                entries.append((ep.url, body))
        if not entries:
            return None
        claim = None
        neighbours: tuple[str, ...] = ()
        if self.redis is not None and kind in CLAIMED:
            b = t_ms // self.bucket_ms
            base = f"{self.prefix}:webhooks:claim:{app_id}:{kind}:{channel}:{user or ''}:"
            claim = f"{base}{b}"
            neighbours = (f"{base}{b - 1}", f"{base}{b + 1}")
        cluster = None
        if cl is not None and kind in ("channel_occupied", "channel_vacated"):
            cluster = (cl.id, channel)
        return Edge(claim, neighbours, app_id, entries, cluster)

    # ------------------------------------------------------------------ outbox → endpoints

    def _deliver(self, items: list[Item]) -> None:
        for it in items:
            key = (it.app_id, it.url)
            s = self._senders.get(key)
            if s is None:
                s = self._senders[key] = _Sender(it.app_id, it.url)
                s.task = asyncio.get_running_loop().create_task(self._send_loop(s),
                                                                name=f"webhooks-send {it.url}")
            s.queue.append(it)
            s.wake.set()

    def _endpoint(self, app_id: str, url: str) -> Endpoint | None:
        for ep in self.endpoints(app_id):
            if ep.url == url:
                return ep
        return None

    async def _send_loop(self, s: _Sender) -> None:
        cfg = self.cfg
        batch_max = max(1, cfg.webhook_batch_max)
        while True:
            if not s.queue:
                s.wake.clear()
                await s.wake.wait()
            now = time.monotonic()
            # one POST per flush interval (the rest coalesces), at once when a batch is full
            at = s.retry_at if s.backoff else (
                now if len(s.queue) >= batch_max else s.last_post + self.flush_interval)
            if at > now:
                await asyncio.sleep(at - now)
            n = min(len(s.queue), batch_max)
            batch = s.inflight = [s.queue.popleft() for _ in range(n)]
            try:
                await self._post(s, batch)
            except asyncio.CancelledError:
                s.queue.extendleft(reversed(batch))
                s.inflight = []
                raise
            except Exception:
                log.exception("webhooks: sender failed")
                s.queue.extendleft(reversed(batch))
                await asyncio.sleep(1.0)
            s.inflight = []

    async def _post(self, s: _Sender, batch: list[Item]) -> None:
        app = self.apps.by_id(s.app_id)
        ep = self._endpoint(s.app_id, s.url) if app is not None else None
        if app is None or ep is None:
            await self.outbox.dead(batch, "endpoint no longer configured")
            self.stats.dead += len(batch)
            return
        body = b'{"time_ms":%d,"events":[%s]}' % (self._now_ms(), b",".join(it.event for it in batch))
        headers = [("X-Pusher-Key", app.key),
                   ("X-Pusher-Signature", hmac_sha256_hex(app.secret_bytes, body)),
                   *ep.headers]
        error = None
        try:
            status = await self.http.post(s.url, body, headers)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except HttpError as e:
            error = str(e)
        s.last_post = time.monotonic()
        if error is None:
            s.backoff = 0.0
            self.stats.delivered += len(batch)
            await self.outbox.done(batch)
            return
        self.stats.failures += 1
        cutoff = time.time() - self.cfg.webhook_retry_window
        expired = [it for it in batch if it.created <= cutoff]
        keep = [it for it in batch if it.created > cutoff]
        if expired:
            log.warning("webhooks: %d events for %s dead-lettered after %gs (%s)", len(expired),
                        s.url, self.cfg.webhook_retry_window, error)
            await self.outbox.dead(expired, error)
            self.stats.dead += len(expired)
        s.queue.extendleft(reversed(keep))
        base = max(0.01, self.cfg.webhook_retry_base)
        s.backoff = base if not s.backoff else min(s.backoff * 2, max(base, self.cfg.webhook_retry_max))
        s.retry_at = time.monotonic() + s.backoff
        if keep:
            log.info("webhooks: POST to %s failed (%s); retry in %.2fs", s.url, error, s.backoff)

    async def _keep_loop(self) -> None:
        """Redis: keeps entries this node still holds from being taken over as abandoned."""
        interval = max(0.5, self.cfg.webhook_reclaim_idle / 3)
        while True:
            await asyncio.sleep(interval)
            held = [it for s in self._senders.values() for it in (*s.inflight, *s.queue)]
            for i in range(0, len(held), 1000):
                try:
                    await self.outbox.keep(held[i:i + 1000])
                except Exception as e:
                    log.warning("webhooks: keep-alive of held entries failed (%r)", e)
