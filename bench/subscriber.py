"""Subscriber worker process: many picows WebSocket clients on one uvloop.

The parent drives it over a multiprocessing pipe:
  parent -> ("connect",)        open all connections, subscribe, reply ("ready", info)
  parent -> ("measure", S)      count only events with seq >= S from now on, reply ("measuring",)
  parent -> ("stop",)           reply ("result", {...}), close everything, exit
  child  -> ("tick", total, n)  about every 0.5 s: bench frames seen / counted so far
The worker exits by itself if the pipe closes or its lifetime runs out, so a dead parent or a
dead server never leaves it behind.
"""

from __future__ import annotations

import asyncio
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import orjson
import picows
import uvloop

from bench.common import (
    BENCH_EVENT,
    MARK,
    N_BUCKETS,
    S_DIGITS,
    S_OFF,
    T_DIGITS,
    T_OFF,
    raise_nofile,
    self_cpu_s,
)

_mono = time.monotonic_ns
_T0, _T1 = T_OFF, T_OFF + T_DIGITS
_S0, _S1 = S_OFF, S_OFF + S_DIGITS
NEVER = 10**15


class State:
    def __init__(self) -> None:
        self.seq_start = NEVER
        self.total = 0  # bench frames of any phase (progress)
        self.n = 0  # frames in the measured window
        self.hist = [0] * N_BUCKETS
        self.first: dict[int, int] = {}
        self.verify_every = 997
        self.verify_ok = 0
        self.verify_fail = 0
        self.fail_samples: list[str] = []
        self.disconnects = 0
        self.errors: dict[str, int] = {}
        self.closing = False

    def err(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


ST = State()


class Sub(picows.WSListener):
    def __init__(self, channel: str | None) -> None:
        self.channel = channel
        loop = asyncio.get_event_loop()
        self.established: asyncio.Future[None] = loop.create_future()
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self.tr: picows.WSTransport | None = None

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.tr = transport

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        # Hot path: one find + two int() slices per delivery; no JSON decode.
        b = frame.get_payload_as_bytes()
        i = b.find(MARK)
        if i >= 0:
            st = ST
            st.total += 1
            s = int(b[i + _S0 : i + _S1])
            if s < st.seq_start:
                return
            lat = _mono() - int(b[i + _T0 : i + _T1])
            n = st.n = st.n + 1
            # hist_index(lat) from bench.common, inlined (hot path)
            sh = lat.bit_length() - 7
            st.hist[(sh << 6) + (lat >> sh) if sh > 0 else (lat if lat > 0 else 0)] += 1
            first = st.first
            if s not in first:
                first[s] = lat
            if n % st.verify_every == 0:
                self.verify(b)
            return
        self.control(transport, frame, b)

    def verify(self, b: bytes) -> None:
        """Full decode of a sample: right event name, right channel, marker inside data."""
        try:
            m = orjson.loads(b)
            data = m.get("data")
            ok = (
                m.get("event") == BENCH_EVENT
                and m.get("channel") == self.channel
                and "~T" in (data if isinstance(data, str) else orjson.dumps(data).decode())
            )
        except (orjson.JSONDecodeError, AttributeError):
            ok = False
        if ok:
            ST.verify_ok += 1
        else:
            ST.verify_fail += 1
            if len(ST.fail_samples) < 5:
                ST.fail_samples.append(b[:300].decode("utf-8", "replace"))

    def control(self, transport: picows.WSTransport, frame: picows.WSFrame, b: bytes) -> None:
        mt = frame.msg_type
        if mt == picows.WSMsgType.CLOSE:
            ST.err(f"close {frame.get_close_code()}")
            transport.disconnect()
            return
        if mt != picows.WSMsgType.TEXT:
            return
        try:
            m = orjson.loads(b)
            ev = m.get("event")
        except (orjson.JSONDecodeError, AttributeError):
            ST.err("bad json")
            return
        if ev == "pusher:connection_established":
            if not self.established.done():
                self.established.set_result(None)
        elif ev == "pusher_internal:subscription_succeeded":
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif ev == "pusher:ping":
            transport.send(picows.WSMsgType.TEXT, b'{"event":"pusher:pong","data":{}}')
        elif ev == "pusher:error":
            ST.err(f"pusher:error {str(m.get('data'))[:80]}")
        elif ev == "pusher:pong":
            pass
        else:
            ST.err(f"unexpected {str(ev)[:40]}")

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not ST.closing:
            ST.disconnects += 1
        for f in (self.established, self.subscribed):
            if not f.done():
                f.set_exception(ConnectionError("disconnected"))
                f.exception()  # mark retrieved: nobody awaits it when we are closing


def _source_ip(cfg: dict[str, Any], i: int) -> str | None:
    n = int(cfg.get("source_ips") or 0)
    return f"127.0.0.{2 + (cfg.get('proc', 0) + i) % n}" if n else None


async def _open_one(
    url: str, channel: str | None, sem: asyncio.Semaphore, timeout: float, subs: list[Sub],
    source_ip: str | None = None,
) -> str | None:
    async with sem:
        try:
            # a loopback source address of its own per slice of connections: one address
            # has only ~28k ephemeral ports towards one server port
            extra = {"local_addr": (source_ip, 0)} if source_ip else {}
            _, lis = await picows.ws_connect(
                lambda: Sub(channel),
                url,
                websocket_handshake_timeout=timeout,
                read_buffer_init_size=4096,
                **extra,
            )
        except (TimeoutError, OSError, picows.WSError) as e:
            return f"connect: {type(e).__name__}"
        assert isinstance(lis, Sub)
        subs.append(lis)
        try:
            await asyncio.wait_for(lis.established, timeout)
        except (TimeoutError, ConnectionError):
            return "no connection_established"
        if channel is None:
            return None
        assert lis.tr is not None
        lis.tr.send(
            picows.WSMsgType.TEXT,
            orjson.dumps({"event": "pusher:subscribe", "data": {"channel": channel}}),
        )
        try:
            await asyncio.wait_for(lis.subscribed, timeout)
        except (TimeoutError, ConnectionError):
            return "no subscription_succeeded"
        return None


async def _worker(conn: Connection, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(cfg["lifetime"])
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("eof",))

    loop.add_reader(conn.fileno(), readable)
    os.set_blocking(conn.fileno(), True)  # libuv set it non-blocking; see Fleet.start

    def send(msg: Any) -> None:
        try:
            conn.send(msg)
        except (BrokenPipeError, OSError):
            inbox.put_nowait(("eof",))

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.5)
            send(("tick", ST.total, ST.n))

    async def next_cmd() -> Any:
        left = deadline - loop.time()
        if left <= 0:
            return ("eof",)
        try:
            return await asyncio.wait_for(inbox.get(), left)
        except TimeoutError:
            return ("eof",)

    subs: list[Sub] = []
    tick_task: asyncio.Task[None] | None = None
    cpu0 = self_cpu_s()
    try:
        while True:
            cmd = await next_cmd()
            if cmd[0] == "connect":
                sem = asyncio.Semaphore(int(cfg["concurrency"]))
                t0 = time.monotonic()
                cpu_c0 = self_cpu_s()
                chans: list[str | None] = cfg["channels"]
                urls: list[str] = cfg["urls"]
                res = await asyncio.gather(
                    *(_open_one(urls[i % len(urls)], ch, sem, float(cfg["timeout"]), subs,
                                _source_ip(cfg, i))
                      for i, ch in enumerate(chans))
                )
                t1 = time.monotonic()
                per_channel: dict[str, int] = {}
                fails: dict[str, int] = {}
                for ch, r in zip(chans, res, strict=True):
                    if r is None:
                        if ch is not None:
                            per_channel[ch] = per_channel.get(ch, 0) + 1
                    else:
                        fails[r] = fails.get(r, 0) + 1
                ok = sum(1 for r in res if r is None)
                send(
                    (
                        "ready",
                        {
                            "ok": ok,
                            "failed": fails,
                            "per_channel": per_channel,
                            "t0": t0,
                            "t1": t1,
                            "cpu_s": self_cpu_s() - cpu_c0,
                        },
                    )
                )
                tick_task = asyncio.create_task(ticker())
            elif cmd[0] == "measure":
                ST.seq_start = int(cmd[1])
                cpu0 = self_cpu_s()
                send(("measuring",))
            elif cmd[0] == "stop":
                cpu = self_cpu_s() - cpu0
                send(
                    (
                        "result",
                        {
                            "n": ST.n,
                            "total": ST.total,
                            "hist": ST.hist,
                            "first": ST.first,
                            "verify_ok": ST.verify_ok,
                            "verify_fail": ST.verify_fail,
                            "fail_samples": ST.fail_samples,
                            "disconnects": ST.disconnects,
                            "errors": ST.errors,
                            "cpu_s": cpu,
                            "alive": sum(1 for s in subs if s.tr and not s.tr.is_disconnected),
                        },
                    )
                )
                return
            elif cmd[0] == "eof":
                return
    finally:
        ST.closing = True
        if tick_task is not None:
            tick_task.cancel()
        for s in subs:
            if s.tr is not None and not s.tr.is_disconnected:
                s.tr.disconnect(graceful=False)
        await asyncio.sleep(0.05)


def worker_main(conn: Connection, cfg: dict[str, Any]) -> None:
    raise_nofile()
    uvloop.run(_worker(conn, cfg))
