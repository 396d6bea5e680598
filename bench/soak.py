"""Soak test: N WebSocket connections with steady traffic for a long time; is anything leaking?

    python -m bench.soak                          # 10,000 connections, 600 s, spawns a server
    python -m bench.soak -n 2000 -d 60            # a short one
    python -m bench.soak --url http://127.0.0.1:6001 --app-id .. --key .. --secret .. --pid PID

Without --url it starts `python -m fastrelay serve` (1 worker, SQLite audit, its own data
dir) on a free port and stops it at the end. Traffic, all to 127.0.0.1:
  * N connections over --procs client processes, each subscribed to one of --channels public
    channels (round-robin), held for the whole run;
  * signed Pusher HTTP API publishes (/apps/{id}/events) at --rate per second, round-robin
    over those channels; each carries a monotonic timestamp, so every subscriber measures
    delivery latency (CLOCK_MONOTONIC is system-wide);
  * --presence of the connections churn: subscribe to one of 10 presence channels (signed
    auth), send one client event (delivered to the other members: also timed), unsubscribe,
    pause, again.
Every --sample seconds (10) a line: elapsed, server RSS (summed over its process tree, from
/proc), open connections, published, delivered, missing, p50/p99 of that window, errors.
Flat RSS after the warm-up means no leak. At the end: JSON and a PNG chart (matplotlib).
Errors are HTTP non-2xx, unexpected closes, pusher:error, and deliveries missing at the end
(expected = publishes x subscribers of the channel).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import picows

from bench.common import (
    MARK,
    N_BUCKETS,
    T_DIGITS,
    T_OFF,
    free_port,
    hist_index,
    hist_merge,
    hist_percentiles,
    pusher_signed_path,
    raise_nofile,
    tree_rss_kib,
)
from bench.httpclient import HTTPConnection, http_get_status

ROOT = Path(__file__).resolve().parent.parent
_mono = time.monotonic_ns
PRESENCE_CHANNELS = 10


# ---------------------------------------------------------------- client processes

class Stats:
    def __init__(self) -> None:
        self.delivered = 0
        self.client_events = 0
        self.hist = [0] * N_BUCKETS  # ns, this sample window
        self.errors: dict[str, int] = {}
        self.open = 0
        self.closing = False

    def err(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


ST = Stats()


class Client(picows.WSListener):
    def __init__(self, channel: str) -> None:
        loop = asyncio.get_event_loop()
        self.channel = channel
        self.tr: picows.WSTransport | None = None
        self.socket_id = ""
        self.established: asyncio.Future[None] = loop.create_future()
        self.acks: dict[str, asyncio.Future[None]] = {}

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.tr = transport
        ST.open += 1

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        b = frame.get_payload_as_bytes()
        i = b.find(MARK)
        if i >= 0:  # "~T<19 digits>~"
            lat = _mono() - int(b[i + T_OFF : i + T_OFF + T_DIGITS])
            ST.hist[hist_index(lat)] += 1
            if b.find(b'"client-') >= 0:
                ST.client_events += 1
            else:
                ST.delivered += 1
            return
        if frame.msg_type == picows.WSMsgType.CLOSE:
            if not ST.closing:
                ST.err(f"close {frame.get_close_code()}")
            transport.disconnect()
            return
        if frame.msg_type != picows.WSMsgType.TEXT:
            return
        try:
            m = orjson.loads(b)
            ev = m.get("event")
        except (orjson.JSONDecodeError, AttributeError):
            ST.err("bad json")
            return
        if ev == "pusher:connection_established":
            self.socket_id = orjson.loads(m["data"])["socket_id"]
            if not self.established.done():
                self.established.set_result(None)
        elif ev == "pusher_internal:subscription_succeeded":
            f = self.acks.pop(m.get("channel"), None)
            if f is not None and not f.done():
                f.set_result(None)
        elif ev == "pusher:ping":
            transport.send(picows.WSMsgType.TEXT, b'{"event":"pusher:pong","data":{}}')
        elif ev in ("pusher:error", "pusher:subscription_error"):
            ST.err(f"{ev} {str(m.get('data'))[:60]}")
        # member_added / member_removed / pong: expected, ignored

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        ST.open -= 1
        if not ST.closing:
            ST.err("disconnected")
        if not self.established.done():
            self.established.set_exception(ConnectionError("disconnected"))
            self.established.exception()

    def send(self, msg: dict[str, Any]) -> None:
        if self.tr is not None:
            self.tr.send(picows.WSMsgType.TEXT, orjson.dumps(msg))

    async def subscribe(self, channel: str, timeout: float = 10.0, **extra: Any) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.acks[channel] = fut
        self.send({"event": "pusher:subscribe", "data": {"channel": channel, **extra}})
        await asyncio.wait_for(fut, timeout)


async def _open(url: str, channel: str, sem: asyncio.Semaphore) -> Client | None:
    async with sem:
        try:
            _, c = await picows.ws_connect(lambda: Client(channel), url,
                                           websocket_handshake_timeout=10,
                                           read_buffer_init_size=2048)
            await asyncio.wait_for(c.established, 10)
            await c.subscribe(channel)
            return c
        except (TimeoutError, OSError, ConnectionError, picows.WSError) as e:
            ST.err(f"connect {type(e).__name__}")
            return None


async def _churn(c: Client, cfg: dict[str, Any], idx: int) -> None:
    """Presence churn on one connection: join, one client event, leave, pause, repeat."""
    rnd = random.Random(idx)
    key, secret = cfg["key"], cfg["secret"].encode()
    await asyncio.sleep(rnd.uniform(0, 10))
    while not ST.closing:
        ch = f"presence-soak-{rnd.randrange(PRESENCE_CHANNELS)}"
        cd = orjson.dumps({"user_id": f"u{cfg['proc']}-{idx}", "user_info": {"n": idx}}).decode()
        sig = hmac.new(secret, f"{c.socket_id}:{ch}:{cd}".encode(), hashlib.sha256).hexdigest()
        try:
            await c.subscribe(ch, auth=f"{key}:{sig}", channel_data=cd)
        except TimeoutError:
            ST.err("presence subscribe timeout")
            await asyncio.sleep(5)
            continue
        await asyncio.sleep(rnd.uniform(1, 4))
        c.send({"event": "client-soak", "channel": ch,
                "data": {"m": f"~T{_mono():019d}~"}})
        await asyncio.sleep(rnd.uniform(1, 4))
        c.send({"event": "pusher:unsubscribe", "data": {"channel": ch}})
        await asyncio.sleep(rnd.uniform(1, 4))


async def _client_main(pipe: Connection, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(100)
    t0 = time.monotonic()
    clients = await asyncio.gather(*(_open(cfg["ws_url"], ch, sem) for ch in cfg["channels"]))
    live = [c for c in clients if c is not None]
    pipe.send(("ready", len(live), time.monotonic() - t0))
    churners = [loop.create_task(_churn(c, cfg, i))
                for i, c in enumerate(live[:cfg["presence"]])]
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: inbox.put_nowait(pipe.recv()))
    while True:  # the driver asks; we answer with this window's counters
        cmd = await inbox.get()
        stop = cmd[0] == "stop"
        if stop:
            ST.closing = True
        pipe.send(("tick", ST.delivered, ST.client_events, ST.hist, ST.errors, ST.open))
        ST.hist = [0] * N_BUCKETS
        if stop:
            break
    loop.remove_reader(pipe.fileno())
    for t in churners:
        t.cancel()
    for c in live:
        if c.tr is not None:
            c.tr.disconnect()
    await asyncio.sleep(0.5)


def client_proc(pipe: Connection, cfg: dict[str, Any]) -> None:
    import uvloop

    raise_nofile()
    uvloop.run(_client_main(pipe, cfg))


# ---------------------------------------------------------------- driver

def spawn_server(port: int, data_dir: Path, app: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTRELAY_", "REVERB_"))}
    env.update({
        "FASTRELAY_HOST": "127.0.0.1", "FASTRELAY_PORT": str(port),
        "FASTRELAY_APP_ID": app["app_id"], "FASTRELAY_APP_KEY": app["key"],
        "FASTRELAY_APP_SECRET": app["secret"], "FASTRELAY_APP_CLIENT_EVENTS": "true",
        "FASTRELAY_DATA_DIR": str(data_dir), "FASTRELAY_LOG_LEVEL": "warning",
        "FASTRELAY_WORKERS": "1",
    })
    log = open(data_dir / "server.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "fastrelay", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(ROOT), preexec_fn=raise_nofile)


async def wait_up(host: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await http_get_status(host, port, "/up", 1) == 200:
            return
        await asyncio.sleep(0.1)
    raise SystemExit("soak: server did not come up")


def pct_ms(h: list[int]) -> dict[str, float | None]:
    return {k: (None if v is None else round(v / 1e6, 3))
            for k, v in hist_percentiles(h, (50, 99, 99.9)).items()}


async def drive(o: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    app = {"app_id": o.app_id, "key": o.key, "secret": o.secret}
    proc = None
    if o.url:
        from urllib.parse import urlsplit
        u = urlsplit(o.url)
        host, port, pid = u.hostname or "127.0.0.1", u.port or 80, o.pid
    else:
        host, port = "127.0.0.1", free_port()
        data_dir = Path(tempfile.mkdtemp(prefix="fastrelay-soak-"))
        proc = spawn_server(port, data_dir, app)
        pid = proc.pid
        print(f"soak: server pid {pid} on :{port}, data dir {data_dir}", file=sys.stderr)
    try:
        await wait_up(host, port)
        return await _run(o, host, port, pid, app)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _run(o: argparse.Namespace, host: str, port: int, pid: int | None,
               app: dict[str, str]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ws_url = f"ws://{host}:{port}/app/{app['key']}?protocol=7&client=soak&version=1.0"
    channels = [f"soak-{i}" for i in range(o.channels)]
    subs_per_channel = {ch: 0 for ch in channels}
    pipes, procs = [], []
    ctx = mp.get_context("fork")
    for p in range(o.procs):
        mine = [channels[i % o.channels] for i in range(p, o.connections, o.procs)]
        for ch in mine:
            subs_per_channel[ch] += 1
        a, b = ctx.Pipe()
        cfg = {"ws_url": ws_url, "channels": mine, "presence": o.presence // o.procs,
               "sample": o.sample, "proc": p, **app}
        pr = ctx.Process(target=client_proc, args=(b, cfg), daemon=True)
        pr.start()
        pipes.append(a)
        procs.append(pr)
    t_conn = time.monotonic()
    opened = 0
    for a in pipes:
        _, n, _dt = await loop.run_in_executor(None, a.recv)
        opened += n
    rss0 = tree_rss_kib(pid) if pid else None
    print(f"soak: {opened}/{o.connections} connected and subscribed in "
          f"{time.monotonic() - t_conn:.1f} s; server RSS {rss0 and rss0 // 1024} MiB",
          file=sys.stderr)

    http = HTTPConnection(host, port)
    await http.connect()
    published = {ch: 0 for ch in channels}
    errors: dict[str, int] = {}
    pad = "x" * max(0, o.size - 40)
    stop_at = loop.time() + o.duration
    samples: list[dict[str, Any]] = []
    total_hist = [0] * N_BUCKETS
    delivered = client_events = 0
    t_start = loop.time()
    next_sample = t_start + o.sample
    seq = 0

    async def collect(final: bool = False) -> None:
        nonlocal delivered, client_events
        for a in pipes:
            a.send(("stop",) if final else ("tick",))
        window = [0] * N_BUCKETS
        d = ce = op = 0
        errs: dict[str, int] = {}
        for a in pipes:
            msg = await loop.run_in_executor(None, a.recv)
            _, dd, cc, h, e, n_open = msg
            d += dd
            ce += cc
            op += n_open
            hist_merge(window, h)
            for k, v in e.items():
                errs[k] = errs.get(k, 0) + v
        hist_merge(total_hist, window)
        delivered, client_events = d, ce
        expected = sum(published[ch] * subs_per_channel[ch] for ch in channels)
        s = {"t": round(loop.time() - t_start, 1),
             "rss_mib": round((tree_rss_kib(pid) or 0) / 1024, 1) if pid else None,
             "open": op, "published": sum(published.values()), "delivered": d,
             "expected_min": expected, "client_events": ce, "latency_ms": pct_ms(window),
             "errors": {**errs, **errors}}
        samples.append(s)
        print(f"[{s['t']:7.1f}s] rss={s['rss_mib']} MiB open={op} pub={s['published']} "
              f"deliv={d} (expected>={expected}) cev={ce} p50={s['latency_ms']['p50']}ms "
              f"p99={s['latency_ms']['p99']}ms errors={s['errors']}", flush=True)

    interval = 1.0 / o.rate
    nxt = loop.time()
    while loop.time() < stop_at:
        now = loop.time()
        if now >= next_sample:
            await collect()
            next_sample += o.sample
        if now < nxt:
            await asyncio.sleep(min(nxt - now, max(0.0, next_sample - now)))
            continue
        nxt += interval
        ch = channels[seq % len(channels)]
        seq += 1
        body = orjson.dumps({"name": "soak", "channels": [ch],
                             "data": f"~T{_mono():019d}~{pad}"})
        try:
            st, _ = await http.request_raw(http.build(
                "POST", pusher_signed_path(app["app_id"], app["key"], app["secret"], body),
                body), timeout=10)
        except Exception as e:
            errors[f"http {type(e).__name__}"] = errors.get(f"http {type(e).__name__}", 0) + 1
            continue
        if st == 200:
            published[ch] += 1
        else:
            errors[f"http {st}"] = errors.get(f"http {st}", 0) + 1
    await asyncio.sleep(2.0)  # let the last deliveries land
    await collect(final=True)
    http.close()
    for pr in procs:
        pr.join(10)
    last = samples[-1]
    missing = max(0, last["expected_min"] - last["delivered"])
    warm = [s["rss_mib"] for s in samples if s["rss_mib"] is not None and s["t"] >= 60]
    return {
        "scenario": "soak", "connections": o.connections, "opened": opened,
        "channels": o.channels, "rate": o.rate, "size": o.size, "presence": o.presence,
        "duration": o.duration, "server_pid": pid,
        "rss_start_mib": rss0 and round(rss0 / 1024, 1),
        "rss_after_warmup_mib": warm[0] if warm else None,
        "rss_end_mib": last["rss_mib"], "rss_max_mib": max((s["rss_mib"] or 0) for s in samples),
        "published": last["published"], "delivered": last["delivered"],
        "expected": last["expected_min"], "missing": missing,
        "client_events_delivered": last["client_events"],
        "latency_ms": pct_ms(total_hist), "errors": last["errors"], "samples": samples,
        "command": " ".join(["python", "-m", "bench.soak", *sys.argv[1:]]),
    }


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    t = [x["t"] for x in s]
    fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax[0].plot(t, [x["rss_mib"] for x in s], marker=".")
    ax[0].set_ylabel("server RSS (MiB)")
    ax[0].set_ylim(bottom=0)
    ax[0].set_title(f"soak: {res['opened']} connections, {res['rate']} publishes/s, "
                    f"{res['duration']:.0f} s")
    ax[1].plot(t, [x["latency_ms"]["p50"] for x in s], label="p50")
    ax[1].plot(t, [x["latency_ms"]["p99"] for x in s], label="p99")
    ax[1].set_ylabel("delivery latency (ms)")
    ax[1].set_xlabel("seconds")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--connections", type=int, default=10_000)
    ap.add_argument("-d", "--duration", type=float, default=600.0, help="seconds of traffic")
    ap.add_argument("-k", "--channels", type=int, default=100)
    ap.add_argument("--rate", type=float, default=20.0, help="HTTP API publishes per second")
    ap.add_argument("--size", type=int, default=200, help="event data bytes")
    ap.add_argument("--presence", type=int, default=200, help="connections doing presence churn")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between report lines")
    ap.add_argument("--url", default=None, help="target server (default: spawn one)")
    ap.add_argument("--pid", type=int, default=None, help="target server pid (for RSS)")
    ap.add_argument("--app-id", default="soak-app")
    ap.add_argument("--key", default="soak-key")
    ap.add_argument("--secret", default="soak-secret")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    o = ap.parse_args()
    import uvloop

    res = uvloop.run(drive(o))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    jp = Path(o.json) if o.json else out / f"soak-{stamp}.json"
    pp = Path(o.png) if o.png else out / f"soak-{stamp}.png"
    jp.write_text(json.dumps(res, indent=2))
    chart(res, pp)
    summary = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    print(f"soak: wrote {jp} and {pp}", file=sys.stderr)


if __name__ == "__main__":
    main()
