"""Operations: Prometheus metrics (`/metrics`), readiness (`/ready`) and the console's tap.

Almost everything is read at scrape time from state the worker keeps anyway (`node.stats`,
the channel table, the audit's `AuditStats`, the Redis bus's counters, `WebhookStats`).
What has to be counted as it happens is an O(1) add on a plain attribute: one per client
message, one per closed socket, one per event fanned out (the latency histogram is one
`bisect` into a list of ints per event, never per delivery). No Python object is created
per delivery.

Several workers (`--workers N`, SO_REUSEPORT): every sample carries a `worker` label
($FASTRELAY_WORKER, the supervisor's slot; "0" for a single worker). Each worker writes its
own exposition to `{data_dir}/metrics/worker-{slot}-{pid}.prom` once per second; whichever
worker answers `/metrics` serves its live figures plus its siblings' fresh files, merged family
by family, so one scrape sees every worker (sum them in PromQL: `sum without (worker) (...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from bisect import bisect_left
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from . import __version__, _core
from .bus import LocalBus
from .http_api import answer_later

if TYPE_CHECKING:
    from ._core import Conn, Request
    from .node import Node

log = logging.getLogger("fastrelay.metrics")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
SNAPSHOT_MAX_AGE = 10.0  # seconds; an older sibling file is a worker that went away
CONSOLE_CHANNEL = "private-fastrelay-console"


def worker_id() -> str:
    return os.environ.get("FASTRELAY_WORKER", "0")


class Histogram:
    """Fixed buckets as a list of ints: observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((repr(bound), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class Ops:
    """One per worker: the metrics exposition (read from `node.stats` and the other parts at
    scrape time), readiness, HTTP request counts and the console's live feed."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.worker = worker_id()
        self.http: dict[tuple[str, int], int] = {}
        self.loop_lag = 0.0
        self.console: dict[str, Any] = {}  # app id -> the console channel, while one is open
        self.started = time.time()
        self._ready_cache: tuple[float, dict[str, Any] | None] = (0.0, None)
        self._tasks: list[asyncio.Task[Any]] = []
        self.snapshot_dir: Path | None = None
        self._console: Any = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_NodeCollector(self))
        self._process = ProcessCollector(registry=None)

    # ------------------------------------------------------------------ hooks

    def console_handler(self) -> Any:
        if self._console is None:
            from .console import Console

            self._console = Console(self.node, self)
        return self._console

    # count_http(route, status): one more answer. Compiled: the hot route counts from C.
    count_http = _core.count_http

    def tap(self, event: Any, sent: int) -> None:
        """The console's live feed: only runs while a console has its channel open."""
        ch = self.console.get(event.app_id)
        if ch is None or CONSOLE_CHANNEL in event.channels:
            return
        from .protocol import message

        ch.fanout(message("fastrelay:event", {
            "id": event.id, "channels": event.channels, "event": event.name,
            "data": event.data[:2000], "source": event.source, "deliveries": sent,
            "latency_ms": round((time.time() - event.accepted_at) * 1000, 3),
            "worker": self.worker,
        }, CONSOLE_CHANNEL))

    # ------------------------------------------------------------------ background

    def start(self) -> None:
        loop = self.node.loop
        cfg = self.node.cfg
        if cfg.workers > 1 or "FASTRELAY_WORKER" in os.environ:
            self.snapshot_dir = Path(cfg.data_dir) / "metrics"
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self._tasks.append(loop.create_task(self._watch_loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.snapshot_dir is not None:
            with contextlib.suppress(OSError):
                self._snapshot_path().unlink()

    async def _watch_loop(self, interval: float = 0.25) -> None:
        """Measures event-loop lag (how late a timer fires); writes the snapshot each second."""
        loop = self.node.loop
        last_snapshot = 0.0
        while True:
            t0 = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - t0 - interval)
            if self.snapshot_dir is not None and t0 - last_snapshot >= 1.0:
                last_snapshot = t0
                self._write_snapshot()

    def _snapshot_path(self) -> Path:
        assert self.snapshot_dir is not None
        return self.snapshot_dir / f"worker-{self.worker}-{os.getpid()}.prom"

    def _write_snapshot(self) -> None:
        assert self.snapshot_dir is not None
        path = self._snapshot_path()
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(self.own_text())
            os.replace(tmp, path)
        except OSError as e:
            log.warning("metrics snapshot failed: %s", e)

    # ------------------------------------------------------------------ exposition

    def families(self) -> list[Any]:
        fams = list(self.registry.collect()) + list(self._process.collect())
        for fam in fams:
            fam.samples = [s._replace(labels={**s.labels, "worker": self.worker})
                           for s in fam.samples]
        return fams

    def own_text(self) -> bytes:
        return generate_latest(_Fixed(self.families()))

    def exposition(self) -> bytes:
        fams = self.families()
        if self.snapshot_dir is not None:
            by_name = {f.name: f for f in fams}
            now = time.time()
            newest: dict[str, tuple[float, Path]] = {}  # slot -> its newest file (reloads overlap)
            for path in self.snapshot_dir.glob("worker-*.prom"):
                slot = path.stem.split("-")[1]
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    continue
                if slot != self.worker and now - mtime <= SNAPSHOT_MAX_AGE \
                        and mtime > newest.get(slot, (0.0, path))[0]:
                    newest[slot] = (mtime, path)
            for _, path in newest.values():
                try:
                    text = path.read_text()
                except OSError:
                    continue
                for fam in text_string_to_metric_families(text):
                    mine = by_name.get(fam.name)
                    if mine is None:
                        by_name[fam.name] = fam
                        fams.append(fam)
                    else:
                        mine.samples.extend(fam.samples)
        return generate_latest(_Fixed(fams))

    # ------------------------------------------------------------------ HTTP

    def serve_metrics(self, conn: Conn, req: Request) -> None:
        conn.respond(200, self.exposition(), CONTENT_TYPE, None, req.keep_alive)

    def serve_ready(self, conn: Conn, req: Request) -> None:
        """200 {"ready": true} or 503 {"ready": false, "reason": ...}; answered from a task
        because it may ask Redis and PostgreSQL (bounded by ready_timeout)."""
        async def run() -> None:
            try:
                problems = await self.readiness()
            except Exception as e:  # an answer, not a 500: the check itself failed
                problems = {"check": repr(e)[:200]}
            status, body = _ready_answer(problems)
            conn.respond(status, body, b"application/json",
                         [("Retry-After", "1")] if problems else None, req.keep_alive)

        answer_later(self.node, conn, req, run())

    async def readiness(self) -> dict[str, str]:
        node, cfg = self.node, self.node.cfg
        problems: dict[str, str] = {}
        if node.draining:
            problems["draining"] = "the server is shutting down"
        if self.loop_lag > cfg.ready_max_loop_lag:
            problems["loop"] = f"event loop lagging {self.loop_lag:.3f} s"
        cached_at, cached = self._ready_cache
        if cached is not None and time.monotonic() - cached_at < 1.0:
            deps = cached
        else:
            deps = await self._dependencies()
            self._ready_cache = (time.monotonic(), deps)
        problems.update(deps)
        return problems

    async def _dependencies(self) -> dict[str, str]:
        node, cfg = self.node, self.node.cfg
        out: dict[str, str] = {}
        timeout = cfg.ready_timeout
        redis = getattr(node, "redis", None)
        if cfg.redis_url and redis is not None:
            try:
                await asyncio.wait_for(redis.ping(), timeout)
            except Exception as e:
                out["redis"] = f"unreachable ({type(e).__name__})"
        urls = {u for u in (cfg.database_url, cfg.apps_database_url) if u}
        for url in urls:
            try:
                await asyncio.wait_for(_pg_ping(url, timeout), timeout + 0.5)
            except Exception as e:
                out["postgresql"] = f"unreachable ({type(e).__name__})"
        audit = node.audit
        if audit is not None and getattr(audit, "backend", "") == "postgresql" \
                and audit.spill_pending_rows and "postgresql" not in out:
            out["audit"] = f"{audit.spill_pending_rows} rows waiting in the spill file"
        return out


def _ready_answer(problems: dict[str, str]) -> tuple[int, bytes]:
    """/ready's status and body: 200 {"ready": true}, or 503 {"ready": false, "reason": ...,
    "checks": {...}}."""
    if not problems:
        return 200, b'{"ready":true}'
    return 503, orjson.dumps({"ready": False,
                              "reason": "; ".join(f"{k}: {v}" for k, v in problems.items()),
                              "checks": problems})


async def _pg_ping(url: str, timeout: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


class _Fixed:
    """A registry-like object over a fixed list of families (generate_latest only collects)."""

    def __init__(self, fams: list[Any]) -> None:
        self.fams = fams

    def collect(self) -> list[Any]:
        return self.fams


class _NodeCollector:
    """Reads the worker's state at scrape time."""

    def __init__(self, ops: Ops) -> None:
        self.ops = ops

    def collect(self) -> list[Any]:  # noqa: C901 (a flat list of metrics)
        ops, node = self.ops, self.ops.node
        s = node.stats
        out: list[Any] = []

        def gauge(name: str, doc: str, value: float) -> None:
            out.append(GaugeMetricFamily(name, doc, value=value))

        def counter(name: str, doc: str, value: float) -> None:
            out.append(CounterMetricFamily(name, doc, value=value))

        info = GaugeMetricFamily("fastrelay_info", "Build information", labels=["version"])
        info.add_metric([__version__], 1)
        out.append(info)
        gauge("fastrelay_start_time_seconds", "Unix time the worker started", ops.started)
        gauge("fastrelay_draining", "1 while the worker is shutting down", int(node.draining))
        gauge("fastrelay_event_loop_lag_seconds", "How late the last 250 ms timer fired",
              ops.loop_lag)

        # connections
        gauge("fastrelay_tcp_connections", "Open TCP connections (HTTP and WebSocket)",
              _core.connection_count())
        gauge("fastrelay_websockets", "Open WebSocket connections", _core.websocket_count())
        counter("fastrelay_connections_opened", "Pusher connections established",
                s.connections_opened)
        closed = CounterMetricFamily("fastrelay_connections_closed",
                                     "Pusher connections closed, by the code the server sent "
                                     "(\"other\": client close, timeouts, errors)", labels=["code"])
        known = 0
        for code, n in sorted(ops.node.stats.closed_by_code.items()):
            closed.add_metric([code], n)
            known += n
        closed.add_metric(["other"], max(0, ops.node.stats.closed - known))
        out.append(closed)

        # per app
        conns = GaugeMetricFamily("fastrelay_connections", "Pusher connections by app", labels=["app"])
        chans = GaugeMetricFamily("fastrelay_channels", "Occupied channels by app", labels=["app"])
        subs = GaugeMetricFamily("fastrelay_subscriptions", "Channel subscriptions by app",
                                 labels=["app"])
        members = GaugeMetricFamily("fastrelay_presence_members",
                                    "Distinct users in presence channels by app", labels=["app"])
        per: dict[str, list[int]] = {app.id: [0, 0, 0] for app in node.apps.all()}
        for (app_id, _), ch in node.channels.entries.items():
            row = per.setdefault(app_id, [0, 0, 0])
            row[0] += 1
            row[1] += len(ch.members)
            if ch.roster is not None:
                row[2] += len(ch.roster)
        for app_id, (nc, ns, nm) in sorted(per.items()):
            conns.add_metric([app_id], node.app_connections(app_id))
            chans.add_metric([app_id], nc)
            subs.add_metric([app_id], ns)
            members.add_metric([app_id], nm)
        out += [conns, chans, subs, members]

        # messages
        counter("fastrelay_messages_received", "WebSocket messages received from clients",
                ops.node.stats.messages_in)
        counter("fastrelay_received_bytes", "WebSocket message bytes received from clients",
                ops.node.stats.bytes_in)
        counter("fastrelay_events_published", "Events accepted over the HTTP APIs", s.published)
        counter("fastrelay_client_events", "Client events (client-*) relayed", s.client_events)
        counter("fastrelay_deliveries", "Event frames queued to subscribers (messages out)",
                s.deliveries)
        counter("fastrelay_delivered_data_bytes",
                "Event data bytes delivered (data length x subscribers, envelope excluded)",
                ops.node.stats.delivered_data_bytes)
        counter("fastrelay_stale_dropped", "Events dropped as older than event_ttl", s.stale_dropped)
        counter("fastrelay_slow_consumer_closes", "Sockets closed (4100) for a full outbound buffer",
                s.closed_slow)
        h = ops.node.stats.latency
        out.append(HistogramMetricFamily(
            "fastrelay_delivery_latency_seconds",
            "From accepted_at to the end of its fan-out, per event delivered by this worker",
            buckets=h.buckets(), sum_value=h.total))

        # HTTP
        http = CounterMetricFamily("fastrelay_http_requests", "HTTP requests by route and status",
                                   labels=["route", "status"])
        for (route, status), n in sorted(ops.http.items()):
            http.add_metric([route, str(status)], n)
        out.append(http)
        intake = node.intake
        counter("fastrelay_rate_limited", "API requests refused with 429 (per-app rate limit)",
                getattr(intake, "rate_limited", 0) if intake is not None else 0)
        counter("fastrelay_audit_refused", "Events refused with 503 because the audit queue was full",
                s.audit_refused)

        # audit
        audit = node.audit
        if audit is not None:
            a = audit.stats
            gauge("fastrelay_audit_queue_depth", "Events waiting to be written", audit.queue_depth)
            gauge("fastrelay_audit_spill_pending_rows", "Rows in the spill file",
                  audit.spill_pending_rows)
            gauge("fastrelay_audit_healthy", "1 when the database took the last write",
                  int(bool(audit.healthy)))
            counter("fastrelay_audit_recorded", "Events queued for the audit", a.recorded)
            counter("fastrelay_audit_rows_written", "Rows committed to the database", a.rows_written)
            counter("fastrelay_audit_write_errors", "Failed database writes", a.write_errors)
            counter("fastrelay_audit_spilled_rows", "Rows written to the spill file", a.spilled_rows)
            counter("fastrelay_audit_replayed_rows", "Rows written back from the spill file",
                    a.replayed_rows)
            counter("fastrelay_audit_rejected_rows", "Rows the database refused as invalid",
                    a.rejected_rows)
            out.append(SummaryMetricFamily("fastrelay_audit_write_seconds",
                                           "Database batch write time", count_value=a.batches,
                                           sum_value=a.write_seconds))
            gauge("fastrelay_audit_last_write_seconds", "Latency of the last batch write",
                  a.last_write_latency)

        # bus: the Redis bus's counters (the in-process bus has none: 0)
        rb = None if isinstance(node.bus, LocalBus) else node.bus
        gauge("fastrelay_bus_lag_seconds", "Bus delivery lag (0 for the in-process bus)",
              rb.lag if rb is not None else 0)
        counter("fastrelay_bus_reconnects", "Bus reconnects", rb.reconnects if rb is not None else 0)
        counter("fastrelay_bus_published", "Events published on the bus",
                rb.published if rb is not None else 0)
        counter("fastrelay_bus_received", "Events received from the bus",
                rb.received if rb is not None else 0)
        counter("fastrelay_bus_forged", "Bus messages dropped for a bad MAC (forged or corrupted)",
                rb.forged if rb is not None else 0)
        counter("fastrelay_bus_dropped",
                "Bus messages dropped unsent because the outgoing queue was full (Redis away)",
                rb.dropped if rb is not None else 0)

        # webhooks (when an app has endpoints)
        wh = node.webhooks.stats if node.webhooks is not None else None
        counter("fastrelay_webhook_deliveries", "Webhook events acknowledged (2xx) by an endpoint",
                wh.delivered if wh is not None else 0)
        counter("fastrelay_webhook_retries", "Failed webhook POSTs (each is retried with back-off)",
                wh.failures if wh is not None else 0)
        counter("fastrelay_webhook_failures", "Webhook events given up on (moved to dead letters)",
                wh.dead if wh is not None else 0)
        counter("fastrelay_webhook_edges", "Channel and member edges recorded for webhooks",
                wh.edges if wh is not None else 0)
        gauge("fastrelay_console_open", "Apps with a live console feed open", len(ops.console))
        return out


async def start_metrics_server(ops: Ops, host: str, port: int) -> asyncio.AbstractServer:
    """A tiny separate listener for `metrics_port`: /metrics, /up and /ready only."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1].split(b"?", 1)[0] if b" " in head else b""
            status, ctype, body = 404, b"application/json", b'{"error":"not found"}'
            if path == b"/metrics":
                status, ctype, body = 200, CONTENT_TYPE, ops.exposition()
            elif path == b"/up":
                status, ctype, body = 200, b"text/plain", b"OK"
            elif path == b"/ready":
                status, body = _ready_answer(await ops.readiness())
            reason = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}[status]
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (status, reason, ctype, len(body)) + body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_port=True)
