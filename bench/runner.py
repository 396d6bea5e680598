"""Scenario drivers: subscriber fleet (child processes), HTTP publisher, progress, measurement."""

from __future__ import annotations

import argparse
import asyncio
import errno
import multiprocessing as mp
import os
import sys
import time
import uuid
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import orjson

from bench.common import (
    BENCH_EVENT,
    Endpoint,
    fastrelay_signature,
    hist_from_values,
    hist_merge,
    hist_new,
    hist_percentiles,
    marker,
    pid_alive,
    pusher_signed_path,
    raise_nofile,
    self_cpu_s,
    system_cpu,
    tree_cpu_s,
    tree_rss_kib,
)
from bench.httpclient import HTTPConnection, HTTPError
from bench.subscriber import worker_main

MEASURE_SEQ = 10**9  # measured events are numbered from here; warm-up ones stay below
LAT_PS = (50, 90, 99, 99.9)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
class Fleet:
    """Subscriber processes; each runs bench.subscriber.worker_main on its share of sockets."""

    def __init__(
        self,
        urls: list[str],
        channels: list[str | None],
        procs: int,
        concurrency: int,
        timeout: float,
        lifetime: float,
        source_ips: int = 0,
    ) -> None:
        procs = max(1, min(procs, len(channels))) if channels else 0
        self.chunks = [channels[i::procs] for i in range(procs)]
        self.cfg = {
            "source_ips": source_ips,
            "urls": urls,
            "concurrency": max(1, concurrency // max(1, procs)),
            "timeout": timeout,
            "lifetime": lifetime,
        }
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.queues: list[asyncio.Queue[Any]] = []
        self.ticks: list[tuple[int, int]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        for i, chunk in enumerate(self.chunks):
            a, b = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(b, dict(self.cfg, channels=chunk, proc=i)), daemon=True
            )
            p.start()
            b.close()
            self.procs.append(p)
            self.conns.append(a)
            self.queues.append(asyncio.Queue())
            self.ticks.append((0, 0))
            loop.add_reader(a.fileno(), partial(self._readable, i))
            # libuv makes polled fds non-blocking; a pickled result bigger than the pipe
            # buffer would then fail half-read with BlockingIOError.
            os.set_blocking(a.fileno(), True)

    def _readable(self, i: int) -> None:
        try:
            msg = self.conns[i].recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conns[i].fileno())
            self.queues[i].put_nowait(("dead",))
            return
        if msg[0] == "tick":
            self.ticks[i] = (msg[1], msg[2])
        else:
            self.queues[i].put_nowait(msg)

    async def _all(self, cmd: tuple[Any, ...], want: str, timeout: float) -> list[Any]:
        for c in self.conns:
            try:
                c.send(cmd)
            except (BrokenPipeError, OSError) as e:
                raise BenchError("a subscriber process died") from e
        out = []
        for q in self.queues:
            try:
                msg = await asyncio.wait_for(q.get(), timeout)
            except TimeoutError as e:
                raise BenchError(f"subscriber process did not answer {cmd[0]!r}") from e
            if msg[0] == "dead":
                codes = [p.exitcode for p in self.procs]
                raise BenchError(f"a subscriber process died (exit codes {codes})")
            if msg[0] != want:
                raise BenchError(f"subscriber process: expected {want}, got {msg[0]}")
            out.append(msg[1] if len(msg) > 1 else None)
        return out

    async def connect(self, timeout: float) -> dict[str, Any]:
        ready = await self._all(("connect",), "ready", timeout)
        per_channel: dict[str, int] = {}
        failed: dict[str, int] = {}
        for r in ready:
            for k, v in r["per_channel"].items():
                per_channel[k] = per_channel.get(k, 0) + v
            for k, v in r["failed"].items():
                failed[k] = failed.get(k, 0) + v
        return {
            "ok": sum(r["ok"] for r in ready),
            "failed": failed,
            "per_channel": per_channel,
            "t0": min((r["t0"] for r in ready), default=0.0),
            "t1": max((r["t1"] for r in ready), default=0.0),
            "cpu_s": sum(r["cpu_s"] for r in ready),
        }

    async def measure(self, seq_start: int) -> None:
        await self._all(("measure", seq_start), "measuring", 10)

    async def stop(self, timeout: float = 20) -> list[dict[str, Any]]:
        return await self._all(("stop",), "result", timeout)

    def totals(self) -> tuple[int, int]:
        return sum(t[0] for t in self.ticks), sum(t[1] for t in self.ticks)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for c in self.conns:
            try:
                loop.remove_reader(c.fileno())
                c.close()
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(3)
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(1)
        self.procs.clear()
        self.conns.clear()


# ---------------------------------------------------------------------------
class Publisher:
    """Signed triggers over keep-alive connections, one request in flight per connection."""

    def __init__(
        self, ep: Endpoint, kind: str, channels: list[str], payload: int, timeout: float = 10
    ) -> None:
        self.ep = ep
        self.kind = kind
        self.channels = channels
        self.pad = "x" * max(0, payload)
        self.timeout = timeout
        self.seq = 1
        self.rr = 0
        self.ok_total = 0
        self.ok_window: dict[str, int] = {}
        self.lat_hist = hist_new()
        self.errors: dict[str, int] = {}
        self.err_samples: list[str] = []
        self.stopping = False
        self.rate: float | None = None
        self.t0 = 0.0
        self.k = 0
        self.max_lag = 0.0
        self.conns: list[HTTPConnection] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.want = 202 if kind == "api-events" else 200
        self.path_api = "/api/events"

    def _err(self, what: str, sample: str = "") -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if sample and len(self.err_samples) < 3:
            self.err_samples.append(sample[:200])

    def build(self, c: HTTPConnection, ch: str, seq: int) -> bytes:
        mk = marker(time.monotonic_ns(), seq)
        if self.kind == "api-events":
            body = orjson.dumps(
                {
                    "app_key": self.ep.key,
                    "channel": ch,
                    "event": BENCH_EVENT,
                    "data": {"m": mk, "p": self.pad},
                }
            )
            ts = int(time.time())
            sig = fastrelay_signature(self.ep.secret, ts, body)
            hdr = f"X-Fastrelay-Timestamp: {ts}\r\nX-Fastrelay-Signature: {sig}\r\n"
            return c.build("POST", self.path_api, body, hdr)
        data = f'{{"m":"{mk}","p":"{self.pad}"}}'
        body = orjson.dumps({"name": BENCH_EVENT, "channels": [ch], "data": data})
        target = pusher_signed_path(self.ep.app_id, self.ep.key, self.ep.secret, body)
        return c.build("POST", target, body)

    async def open(self, n: int) -> None:
        host, port = self.ep.publish_hostport
        for _ in range(n):
            c = HTTPConnection(host, port)
            try:
                await c.connect(5)
            except (TimeoutError, OSError) as e:
                hint = ""
                if isinstance(e, OSError) and e.errno == errno.EADDRNOTAVAIL:
                    # seen right after `connections -n 100000`: its sockets sit in TIME_WAIT
                    hint = " (no local port free: wait a minute for TIME_WAIT sockets to clear)"
                raise BenchError(f"cannot connect to publish URL {host}:{port}: {e}{hint}") from e
            self.conns.append(c)

    def start(self, rate: float | None) -> None:
        """rate: events/s (open loop), or None to publish back-to-back."""
        self.rate = rate
        self.t0 = asyncio.get_running_loop().time()
        self.tasks = [asyncio.create_task(self._worker(c)) for c in self.conns]

    async def _worker(self, c: HTTPConnection) -> None:
        loop = asyncio.get_running_loop()
        chans = self.channels
        nch = len(chans)
        mono = time.monotonic_ns
        while not self.stopping:
            if self.rate:
                k = self.k
                self.k += 1
                due = self.t0 + k / self.rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if self.stopping:
                        return
                elif -delay > self.max_lag:
                    self.max_lag = -delay
            ch = chans[self.rr % nch]
            self.rr += 1
            seq = self.seq
            self.seq += 1
            raw = self.build(c, ch, seq)
            t = mono()
            try:
                status, body = await c.request_raw(raw, self.timeout)
            except (TimeoutError, HTTPError, OSError) as e:
                self._err(type(e).__name__, str(e))
                c.close()
                await asyncio.sleep(0.1)  # do not spin on a dead server
                continue
            lat = mono() - t
            if status == self.want or (self.want == 200 and 200 <= status < 300):
                self.ok_total += 1
                if seq >= MEASURE_SEQ:
                    self.ok_window[ch] = self.ok_window.get(ch, 0) + 1
                    # hist_index(lat), inlined (hot path); lat >= 0 here
                    sh = lat.bit_length() - 7
                    self.lat_hist[(sh << 6) + (lat >> sh) if sh > 0 else lat] += 1
            else:
                self._err(f"HTTP {status}", body.decode("utf-8", "replace"))

    async def stop(self) -> None:
        self.stopping = True
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=self.timeout + 1)
            for t in pending:
                t.cancel()

    def close(self) -> None:
        for c in self.conns:
            c.close()


# ---------------------------------------------------------------------------
class Progress:
    """Prints a live line on stderr about once a second and records per-second series."""

    def __init__(self, label: str, fleet: Fleet | None, pub: Publisher | None) -> None:
        self.label = label
        self.fleet = fleet
        self.pub = pub
        self.phase = "start"
        self.series: dict[str, list[float]] = {
            "t": [], "deliveries_per_s": [], "published_per_s": []
        }
        self.recording = False
        self.t_rec0 = 0.0
        self.task: asyncio.Task[None] | None = None
        self.tty = sys.stderr.isatty()
        self.t_phase = time.monotonic()
        self.extra = ""

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.t_phase = time.monotonic()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        last_t = time.monotonic()
        last_d = self.fleet.totals()[0] if self.fleet else 0
        last_p = self.pub.ok_total if self.pub else 0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            d = self.fleet.totals()[0] if self.fleet else 0
            p = self.pub.ok_total if self.pub else 0
            dt = max(1e-6, now - last_t)
            drate, prate = (d - last_d) / dt, (p - last_p) / dt
            last_t, last_d, last_p = now, d, p
            if self.recording:
                self.series["t"].append(round(now - self.t_rec0, 3))
                self.series["deliveries_per_s"].append(drate)
                self.series["published_per_s"].append(prate)
            line = (
                f"[{self.label}] {self.phase:<8} {now - self.t_phase:5.1f}s  "
                f"published {prate:9,.0f}/s  deliveries {drate:11,.0f}/s  "
                f"total deliveries {d:,}{self.extra}"
            )
            if self.tty:
                sys.stderr.write("\r" + line[:150].ljust(150))
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def stop(self) -> None:
        if self.task:
            self.task.cancel()
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def log(msg: str) -> None:
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


def ms(d: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (None if v is None else round(v / 1e6, 4)) for k, v in d.items()}


class Snap:
    """CPU snapshots of the server tree, this process and the whole machine."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.t = time.monotonic()
        self.server = tree_cpu_s(pid) if pid else None
        self.me = self_cpu_s()
        self.busy, self.total, self.irq = system_cpu()


def cpu_window(a: Snap, b: Snap, gen_children_s: float, srv: Snap | None = None) -> dict[str, Any]:
    """srv: an earlier end snapshot for the server (before the subscribers disconnect, so
    the server's close handling is not charged to the deliveries)."""
    wall = b.t - a.t
    se = srv or b
    server = None if a.server is None or se.server is None else se.server - a.server
    gen = (b.me - a.me) + gen_children_s
    busy = b.busy - a.busy
    total = max(1e-9, b.total - a.total)
    irq = b.irq - a.irq
    other = busy - gen - (server or 0.0) - irq
    return {
        "wall_s": round(wall, 3),
        "server_cpu_s": None if server is None else round(server, 3),
        "generator_cpu_s": round(gen, 3),
        "machine_busy_pct": round(100 * busy / total, 1),
        # kernel irq/softirq work (loopback TCP receive for server and generator alike)
        "softirq_cores": round(irq / max(1e-9, wall), 2),
        # cores used by everything else on the machine during the window
        "other_load_cores": round(other / max(1e-9, wall), 2),
        "ncpu": os.cpu_count(),
    }


def _check_server(pid: int | None) -> None:
    if pid and not pid_alive(pid):
        raise BenchError(f"server pid {pid} is gone")


# ---------------------------------------------------------------------------
async def run_publish(o: argparse.Namespace, ep: Endpoint, pid: int | None) -> dict[str, Any]:
    """fanout and intake: subscribers (maybe none) + publisher, warm-up, window, drain."""
    raise_nofile()
    scenario = o.scenario
    run_id = uuid.uuid4().hex[:6]
    n_conns = int(o.connections)
    k = max(1, int(o.channels))
    if n_conns:
        channels = [f"bench-{run_id}-{i}" for i in range(k)]
    else:
        channels = [f"intake-{run_id}-{i}" for i in range(k)]
    conn_channels: list[str | None] = [channels[i % k] for i in range(n_conns)]
    budget = o.warmup + o.duration + o.drain + o.connect_timeout + 60
    fleet = Fleet(ep.ws_urls, conn_channels, o.procs, o.concurrency, o.connect_timeout, budget)
    pub = Publisher(ep, o.endpoint, channels, o.payload)
    prog = Progress(o.label or scenario, fleet if n_conns else None, pub)
    res: dict[str, Any] = {
        "scenario": scenario,
        "target": o.label or ep.url,
        "params": {
            "url": ep.url,
            "publish_url": ep.publish_url,
            "endpoint": o.endpoint,
            "connections": n_conns,
            "channels": k,
            "mode": "saturate" if o.rate is None else "rate",
            "rate_deliveries_per_s": o.rate,
            "inflight": o.inflight,
            "duration_s": o.duration,
            "warmup_s": o.warmup,
            "payload_pad": o.payload,
            "procs": o.procs,
        },
    }
    try:
        subscribed = 0
        per_channel: dict[str, int] = {}
        if n_conns:
            fleet.start()
            log(f"connecting {n_conns} subscribers, {k} channel(s), {len(fleet.chunks)} procs")
            info = await fleet.connect(o.connect_timeout + n_conns / 500 + 10)
            per_channel = info["per_channel"]
            subscribed = sum(per_channel.values())
            res["subscribe"] = {
                "subscribed": subscribed,
                "failed": info["failed"],
                "seconds": round(info["t1"] - info["t0"], 3),
            }
            log(f"subscribed {subscribed}/{n_conns} in {info['t1'] - info['t0']:.2f}s"
                + (f", failures {info['failed']}" if info["failed"] else ""))
            if subscribed == 0:
                raise BenchError("no subscriber could subscribe")
        _check_server(pid)
        n_http = o.inflight if o.rate is None else o.http_conns
        await pub.open(n_http)
        ev_rate: float | None = None
        if o.rate is not None:
            per_ch = subscribed / k if subscribed else 1.0
            ev_rate = o.rate / per_ch
            res["params"]["events_per_s"] = round(ev_rate, 3)
        prog.start()
        prog.set_phase("warm-up")
        pub.start(ev_rate)
        await asyncio.sleep(o.warmup)
        _check_server(pid)
        if n_conns:
            await fleet.measure(MEASURE_SEQ)
        a = Snap(pid)
        pub.seq = MEASURE_SEQ  # from here on every event counts
        prog.set_phase("measure")
        prog.recording, prog.t_rec0 = True, time.monotonic()
        t_end = time.monotonic() + o.duration
        while time.monotonic() < t_end:
            await asyncio.sleep(min(0.25, max(0.0, t_end - time.monotonic())))
            _check_server(pid)
        t_pub = time.monotonic() - a.t  # the window ends when publishing stops
        await pub.stop()
        prog.recording = False
        expected = sum(per_channel.get(ch, 0) * n for ch, n in pub.ok_window.items())
        # Drain: wait for in-flight deliveries until all arrived or nothing moves for 1 s.
        prog.set_phase("drain")
        if n_conns:
            last, t_last = -1, time.monotonic()
            t_stop = time.monotonic() + o.drain
            while time.monotonic() < t_stop:
                got = fleet.totals()[1]
                if got >= expected:
                    break
                if got != last:
                    last, t_last = got, time.monotonic()
                elif time.monotonic() - t_last > 1.0:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.6)  # ticks are every 0.5 s; let the last one land
        b_srv = Snap(pid)
        b_res = await fleet.stop() if n_conns else []
        b = Snap(pid)
        prog.stop()
        gen_children = sum(r["cpu_s"] for r in b_res)
        cpu = cpu_window(a, b, gen_children, b_srv)
        published = sum(pub.ok_window.values())
        hist = hist_new()
        first: dict[int, int] = {}
        received = 0
        verify_ok = verify_fail = disconnects = 0
        errors: dict[str, int] = {}
        samples: list[str] = []
        for r in b_res:
            hist_merge(hist, r["hist"])
            received += r["n"]
            verify_ok += r["verify_ok"]
            verify_fail += r["verify_fail"]
            disconnects += r["disconnects"]
            samples += r["fail_samples"]
            for kk, v in r["errors"].items():
                errors[kk] = errors.get(kk, 0) + v
            for s, lat in r["first"].items():
                if s not in first or lat < first[s]:
                    first[s] = lat
        first_hist = hist_from_values(first.values())
        work = received if n_conns else published
        per = 1e5 if n_conns else 1.0
        res.update(
            {
                "window_s": round(t_pub, 3),
                "published": published,
                "published_per_s": round(published / t_pub, 1),
                "expected_deliveries": expected,
                "received_deliveries": received,
                "deliveries_per_s": round(received / t_pub, 1),
                "loss_pct": round(100 * (expected - received) / expected, 4) if expected else None,
                "latency_ms": ms(hist_percentiles(hist, LAT_PS)),
                "first_delivery_latency_ms": ms(hist_percentiles(first_hist, (50, 99))),
                "trigger_latency_ms": ms(hist_percentiles(pub.lat_hist, (50, 99))),
                "http_errors": pub.errors,
                # >1 per connection: the server closed keep-alive connections (Connection: close)
                "http_connects": sum(c.connects for c in pub.conns),
                "http_error_samples": pub.err_samples,
                "rate_max_lag_s": round(pub.max_lag, 3) if o.rate is not None else None,
                "verify": {"ok": verify_ok, "fail": verify_fail, "fail_samples": samples[:3]},
                "disconnects": disconnects,
                "client_errors": errors,
                "cpu": cpu,
                "series": prog.series,
                "latency_hist": {str(i): c for i, c in enumerate(hist) if c},
            }
        )
        unit = "per_100k_deliveries" if n_conns else "per_request_us"
        scale = per if n_conns else 1e6
        for who in ("server", "generator"):
            v = cpu[f"{who}_cpu_s"]
            res[f"{who}_cpu_{unit}"] = (
                round(v / work * scale, 4) if v is not None and work else None
            )
        if scenario == "intake":
            res["requests_per_s"] = res["published_per_s"]
        return res
    finally:
        prog.stop()
        await pub.stop()
        pub.close()
        fleet.close()


async def run_connections(o: argparse.Namespace, ep: Endpoint, pid: int | None) -> dict[str, Any]:
    raise_nofile()
    n = int(o.connections)
    budget = o.connect_timeout + n / 200 + o.hold + 60
    fleet = Fleet(ep.ws_urls, [None] * n, o.procs, o.concurrency, o.connect_timeout, budget,
                  getattr(o, "source_ips", 0))
    prog = Progress(o.label or "connections", None, None)
    res: dict[str, Any] = {
        "scenario": "connections",
        "target": o.label or ep.url,
        "params": {"url": ep.url, "connections": n, "procs": o.procs, "concurrency": o.concurrency},
    }
    try:
        rss0 = tree_rss_kib(pid) if pid else None
        fleet.start()
        a = Snap(pid)
        log(f"opening {n} connections in {len(fleet.chunks)} procs")
        info = await fleet.connect(o.connect_timeout + n / 200 + 10)
        b = Snap(pid)
        secs = max(1e-9, info["t1"] - info["t0"])
        await asyncio.sleep(o.hold)  # idle: let the server settle before reading RSS
        _check_server(pid)
        rss1 = tree_rss_kib(pid) if pid else None
        results = await fleet.stop()
        alive = sum(r["alive"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for kk, v in r["errors"].items():
                errors[kk] = errors.get(kk, 0) + v
        ok = info["ok"]
        cpu = cpu_window(a, b, info["cpu_s"])
        res.update(
            {
                "established": ok,
                "failed": info["failed"],
                "all_established": ok == n,
                "alive_after_hold": alive,
                "connect_seconds": round(secs, 3),
                "connections_per_s": round(ok / secs, 1),
                "server_rss_before_kib": rss0,
                "server_rss_after_kib": rss1,
                "rss_per_connection_kib": (
                    round((rss1 - rss0) / ok, 3) if rss0 is not None and rss1 and ok else None
                ),
                "disconnects": sum(r["disconnects"] for r in results),
                "client_errors": errors,
                "cpu": cpu,
                "server_cpu_ms_per_1k_connections": (
                    round(cpu["server_cpu_s"] / ok * 1e6, 2)
                    if cpu["server_cpu_s"] is not None and ok
                    else None
                ),
                "generator_cpu_ms_per_1k_connections": (
                    round(cpu["generator_cpu_s"] / ok * 1e6, 2) if ok else None
                ),
            }
        )
        return res
    finally:
        prog.stop()
        fleet.close()
