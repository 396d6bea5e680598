"""The node: one worker's state (connections, channels, users) and the pipeline's last
stages: events accepted here go to the audit and the bus; events from the bus fan out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from . import _core
from .apps import App, AppManager
from .channels import ChannelTable
from .events import Event
from .metrics import CONSOLE_CHANNEL, LATENCY_BUCKETS, Histogram
from .protocol import PusherProtocol, error, message

if TYPE_CHECKING:
    from .audit import AuditLog
    from .bus import Bus
    from .cluster import Cluster
    from .config import Config
    from .intake import Intake
    from .metrics import Ops
    from .webhooks import WebhookManager

log = logging.getLogger("fastrelay.node")


class Stats:
    """Plain counters; /metrics reads them at scrape time. Counting is an add per event or
    per message, never work per delivery."""

    __slots__ = ("published", "deliveries", "client_events", "stale_dropped", "closed_slow",
                 "connections_opened", "audit_refused", "messages_in", "bytes_in", "closed",
                 "delivered_data_bytes", "closed_by_code", "latency")

    def __init__(self) -> None:
        for name in self.__slots__[:-2]:
            setattr(self, name, 0)
        self.closed_by_code: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)  # accepted -> fanned out, per event

    def closed_with(self, code: int, n: int = 1) -> None:
        key = str(code)
        self.closed_by_code[key] = self.closed_by_code.get(key, 0) + n


class Node:
    """Implements the compiled core's callbacks (on_request, on_message, on_close)."""

    def __init__(self, cfg: Config, apps: AppManager, loop: asyncio.AbstractEventLoop,
                 bus: Bus | None = None, audit: AuditLog | None = None) -> None:
        from .bus import LocalBus
        from .http_api import HttpApi

        self.cfg = cfg
        self.apps = apps
        self.loop = loop
        self.bus: Bus = bus or LocalBus()
        self.audit = audit
        self.channels = ChannelTable()
        self.users: dict[tuple[str, str], set[_core.Conn]] = {}  # signed-in connections
        self.watchers: dict[tuple[str, str], set[_core.Conn]] = defaultdict(set)
        self.watchlists: dict[_core.Conn, list[str]] = {}  # a signed-in socket's watchlist
        self.app_counts: dict[str, int] = defaultdict(int)
        self.caches: dict[tuple[str, str], tuple[bytes, float, Event]] = {}
        self.protocol = PusherProtocol(self)
        self.http = HttpApi(self)
        self.intake: Intake = None  # type: ignore[assignment]  # set by server.serve
        self.cluster: Cluster | None = None  # cluster-wide state when redis_url is set
        self.webhooks: WebhookManager | None = None  # when an app has webhook endpoints
        self.ops: Ops | None = None  # metrics, readiness and the console (set by server.serve)
        self.redis: Any = None  # the shared client when redis_url is set (/ready pings it)
        self.stats = Stats()
        self.draining = False
        self._count_dirty: set[_core.Channel] = set()
        self._local: list[Event] = []  # published here this loop turn, fanned out after it

    # ------------------------------------------------------------------ core callbacks

    # on_request(conn, req): every HTTP request. Compiled: POST /apps/{id}/events runs there
    # end to end; the other routes go to HttpApi.handle.
    on_request = _core.on_request

    def on_message(self, conn: _core.Conn, payload: bytes) -> None:
        self.stats.messages_in += 1
        self.stats.bytes_in += len(payload)
        try:
            self.protocol.on_message(conn, payload)
        except Exception:
            log.exception("message handler failed")
            conn.send(error(None, "internal error"))

    def on_close(self, conn: _core.Conn) -> None:
        self.stats.closed += 1
        try:
            self.protocol.on_close(conn)
        except Exception:
            log.exception("close handler failed")

    def on_swept(self, conn: _core.Conn, code: int) -> None:
        """The sweep closed a connection: 4201 (no pong) or 408 (request too slow)."""
        self.stats.closed_with(code)
        log.info("connection closed", extra={"code": code, "reason": "pong reply not received"
                                             if code == 4201 else "request not completed in time",
                                             "app": conn.app.id if conn.app else None})

    def on_slow_consumer(self, conn: _core.Conn) -> None:
        self.stats.closed_slow += 1
        self.stats.closed_with(4100)
        log.info("connection closed", extra={"code": 4100, "reason": "slow consumer",
                                             "app": conn.app.id if conn.app else None})
        conn.close(4100, "Connection too slow: outbound buffer full")

    # ------------------------------------------------------------------ connections

    def register(self, conn: _core.Conn) -> None:
        self.app_counts[conn.app.id] += 1
        self.stats.connections_opened += 1
        if self.cluster is not None:
            self.cluster.conns_changed(conn.app.id)

    def unregister(self, conn: _core.Conn) -> None:
        if conn.app is not None:
            self.app_counts[conn.app.id] -= 1
            if self.cluster is not None:
                self.cluster.conns_changed(conn.app.id)
        if conn.user_id is not None:
            self.sign_out(conn)

    def app_connections(self, app_id: str) -> int:
        """Connections of an app on this node."""
        return self.app_counts.get(app_id, 0)

    def cluster_app_connections(self, app_id: str) -> int:
        """Connections of an app across the cluster (as of the last count flush)."""
        if self.cluster is not None:
            return self.cluster.app_connections(app_id)
        return self.app_counts.get(app_id, 0)

    def websocket_count(self) -> int:
        return _core.websocket_count()

    # ------------------------------------------------------------------ users

    def sign_in(self, conn: _core.Conn, watchlist: list[str]) -> None:
        app_id = conn.app.id
        key = (app_id, conn.user_id)
        conns = self.users.get(key)
        if conns is None:
            self.users[key] = {conn}
            self._watch_event(app_id, conn.user_id, "online")
        else:
            conns.add(conn)
        if watchlist:
            self.watchlists[conn] = watchlist
            for uid in watchlist:
                self.watchers[(app_id, uid)].add(conn)
            online = [uid for uid in watchlist if (app_id, uid) in self.users]
            if online:
                conn.send(message("pusher_internal:watchlist_events",
                                  {"events": [{"name": "online", "user_ids": online}]}))

    def sign_out(self, conn: _core.Conn) -> None:
        app_id = conn.app.id
        key = (app_id, conn.user_id)
        conns = self.users.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.users[key]
                self._watch_event(app_id, conn.user_id, "offline")
        watchlist = self.watchlists.pop(conn, None)
        if watchlist:
            for uid in watchlist:
                w = self.watchers.get((app_id, uid))
                if w is not None:
                    w.discard(conn)
                    if not w:
                        del self.watchers[(app_id, uid)]
        conn.user_id = None

    def _watch_event(self, app_id: str, user_id: str, name: str) -> None:
        watchers = self.watchers.get((app_id, user_id))
        if watchers:
            frame = message("pusher_internal:watchlist_events",
                            {"events": [{"name": name, "user_ids": [user_id]}]})
            for w in watchers:
                w.send(frame)

    def terminate_user(self, app_id: str, user_id: str) -> None:
        self.terminate_local(app_id, user_id)
        if self.cluster is not None:
            self.cluster.terminate_user(app_id, user_id)

    def terminate_local(self, app_id: str, user_id: str) -> int:
        conns = list(self.users.get((app_id, user_id), ()))
        for conn in conns:
            self.protocol.refuse(conn, 4009, "You got disconnected by the app.")
        return len(conns)

    # ------------------------------------------------------------------ the pipeline

    # accept(events, replay_of=None) -> bool: the audit, then the bus (False: the audit
    # cannot take them, answer 503). Compiled: it runs for every accepted event.
    accept = _core.accept

    def publish_client(self, event: Event) -> None:
        self.stats.client_events += 1
        wh = self.webhooks
        if wh is not None:
            wh.client_event(event.app_id, event.channels[0], event.name, event.data,
                            event.socket_id, event.user_id)
        if self.audit is not None:
            # the app as configured now (an open socket keeps the App it connected with)
            app = self.apps.by_id(event.app_id)
            if app is not None and app.audit_client_events:
                self.audit.record(event)
        self.bus.publish(event)

    # deliver_soon(event): local delivery of an event published on this worker, after the
    # current callback (the HTTP answer leaves first; one loop turn's events fan out together,
    # one send per socket). Compiled: the local bus's publish is this, bound.
    deliver_soon = _core.deliver_soon

    # deliver(event) -> int: fan-out on this worker, one frame per channel, the same bytes
    # to every subscriber; how many were sent. Compiled: it runs for every event.
    deliver = _core.deliver

    def cached(self, app_id: str, name: str) -> bytes | None:
        entry = self.caches.get((app_id, name))
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self.caches[(app_id, name)]
            return None
        return entry[0]

    def cached_event(self, app_id: str, name: str) -> tuple[Event, float] | None:
        entry = self.caches.get((app_id, name))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[2], entry[1] - time.monotonic()

    # ------------------------------------------------------------------ channel edges
    # Hooks for webhooks and cluster state; local no-ops beyond subscription counts.

    def on_occupied(self, ch: _core.Channel) -> None:
        if ch.name == CONSOLE_CHANNEL and self.ops is not None:
            self.ops.console[ch.app_id] = ch
        wh = self.webhooks
        if wh is not None:
            wh.occupied(ch.app_id, ch.name)

    def on_vacated(self, ch: _core.Channel) -> None:
        self._count_dirty.discard(ch)
        if ch.name == CONSOLE_CHANNEL and self.ops is not None:
            self.ops.console.pop(ch.app_id, None)
        wh = self.webhooks
        if wh is not None:
            wh.vacated(ch.app_id, ch.name)
        if self.cluster is not None:
            self.cluster.subs_changed(ch.app_id, ch.name)

    def on_member_added(self, ch: _core.Channel, user_id: str) -> None:
        wh = self.webhooks
        if wh is not None:
            wh.member_added(ch.app_id, ch.name, user_id)

    def on_member_removed(self, ch: _core.Channel, user_id: str) -> None:
        wh = self.webhooks
        if wh is not None:
            wh.member_removed(ch.app_id, ch.name, user_id)

    def on_cache_miss(self, app: App, name: str) -> None:
        wh = self.webhooks
        if wh is not None:
            wh.cache_miss(app.id, name)

    def on_subscription_change(self, ch: _core.Channel) -> None:
        wh = self.webhooks
        if wh is not None:
            wh.subscription_changed(ch)
        if self.cluster is not None:
            self.cluster.subs_changed(ch.app_id, ch.name)
        if ch.roster is not None:
            return  # presence channels report members instead
        app = self.apps.by_id(ch.app_id)
        if app is None or not app.subscription_count:
            return
        if not self._count_dirty:
            # coalesce: a channel filling up sends one count, not one per subscriber
            self.loop.call_later(0.05, self._send_counts)
        self._count_dirty.add(ch)

    def _send_counts(self) -> None:
        dirty, self._count_dirty = self._count_dirty, set()
        for ch in dirty:
            if ch.members:
                ch.fanout(message("pusher_internal:subscription_count",
                                  {"subscription_count": len(ch.members)}, ch.name))

    # ------------------------------------------------------------------ queries (HTTP API)

    # Cluster-wide answers for the HTTP API: from Redis when clustered, else local tables.

    async def channel_counts(self, app_id: str, prefix: str = "") -> dict[str, int]:
        if self.cluster is not None:
            counts = await self.cluster.channel_counts(app_id)
            return {k: v for k, v in counts.items() if k.startswith(prefix)}
        return {ch.name: len(ch.members) for ch in self.channels.of_app(app_id)
                if ch.name.startswith(prefix)}

    async def roster(self, app_id: str, name: str) -> dict[str, Any]:
        if self.cluster is not None:
            return await self.cluster.roster(app_id, name)
        ch = self.channels.get(app_id, name)
        if ch is None or ch.roster is None:
            return {}
        return {uid: entry[1] for uid, entry in ch.roster.items()}

    # ------------------------------------------------------------------ lifecycle

    def sweep(self) -> None:
        cfg = self.cfg
        _core.sweep(cfg.activity_timeout, cfg.pong_timeout, cfg.request_timeout,
                    cfg.idle_timeout, cfg.closing_timeout)
        now = time.monotonic()
        expired = [k for k, v in self.caches.items() if v[1] < now]
        for k in expired:
            del self.caches[k]

    def close_all(self, code: int = 4200, reason: str = "Server shutting down") -> int:
        frame = error(code, reason)
        n = 0
        for conn in _core.connections():
            if conn.is_websocket:
                conn.send(frame)
                conn.close(code, reason)
                n += 1
            else:
                conn.close()
        self.stats.closed_with(code, n)
        return n
