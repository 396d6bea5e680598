"""Reliability: nothing accepted is lost (kill -9 of a worker, PostgreSQL outages), slow
consumers, secrets in logs, connection limits, memory across connection churn.

Real servers (conftest.start_relay), raw sockets (wsclient), all on 127.0.0.1. Redis is the
shared one with a private key prefix per test; PostgreSQL outages go through a local proxy.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pgproxy import ThreadProxy
from wsclient import (
    Closed,
    api,
    connect,
    intake_headers,
    open_ws,
    parse_frame,
    read_http_response,
)
from wsclient import http as raw_request

from fastrelay.signatures import sign_channel

ROOT = Path(__file__).resolve().parent.parent
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def uid() -> str:
    return uuid.uuid4().hex[:10]


# ---------------------------------------------------------------- helpers

def post_once(relay: Any, channel: str, i: int, timeout: float = 5.0) -> str | None:
    """One signed POST /api/events on a new connection (spread over workers by
    SO_REUSEPORT); the event id on 202, None on anything else (refused, reset, timeout)."""
    raw = json.dumps({"app_key": relay.key, "channel": channel, "event": "tick",
                      "data": {"i": i}}).encode()
    c = http.client.HTTPConnection(relay.host, relay.port, timeout=timeout)
    try:
        c.request("POST", "/api/events", raw, intake_headers(relay.secret, raw))
        r = c.getresponse()
        body = r.read()
        return json.loads(body)["id"] if r.status == 202 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        c.close()


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_for(cond: Any, timeout: float, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


@pytest.fixture
def pg_proxy() -> Any:
    p = ThreadProxy()
    yield p
    p.close()


def pg_ids(app_id: str) -> list[str]:
    async def q() -> list[str]:
        conn = await asyncpg.connect(PG_URL)
        try:
            return [r["id"] for r in await conn.fetch(
                "SELECT id FROM public.audit_events WHERE app_id = $1", app_id)]
        finally:
            await conn.close()
    return asyncio.run(q())


def sqlite_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=10)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM audit_events")]
    finally:
        conn.close()


def assert_exactly_once(accepted: list[str], stored: list[str]) -> None:
    assert len(stored) == len(set(stored)), "an id is stored twice"
    missing = set(accepted) - set(stored)
    assert not missing, f"{len(missing)} of {len(accepted)} accepted events are not stored"


# ---------------------------------------------------------------- 1. the journal, unit level

CRASHER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    from fastrelay.audit.sqlite import SqliteAuditLog
    from fastrelay.events import Event

    async def main():
        d = Path(sys.argv[1])
        # the writer never gets to write: everything accepted lives only in the queue
        log = SqliteAuditLog(d / "audit.sqlite3", d, flush_interval=3600, batch_rows=10**6)
        await log.start()
        for i in range(int(sys.argv[2])):
            e = Event("app1", ["orders"], "tick", '{"i": %d}' % i)
            assert log.record(e)
            print(e.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
""")


def test_journal_replays_rows_of_a_killed_process(tmp_path: Path) -> None:

    out = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path), "500"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == -signal.SIGKILL, out.stderr
    ids = out.stdout.split()
    assert len(ids) == 500
    assert sqlite_ids(tmp_path / "audit.sqlite3") == []  # the queue died with the process
    [wal] = (tmp_path / "journal").glob("*.wal")
    frames = wal.read_bytes().rstrip(b"\x00")  # a segment is made at full size: zeros follow
    assert len(frames) < wal.stat().st_size
    with open(wal, "r+b") as f:
        f.seek(len(frames))
        f.write(b"\x00\x00\x01\x00torn")  # a frame cut short by a crash: ignored, not fatal
    copy = wal.read_bytes()
    # a journal whose writer is alive (its lock is held) is not touched
    import fcntl
    live = tmp_path / "journal" / "99999999-1-0.wal"
    live.write_bytes(b"")
    held = os.open(live, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    assert asyncio.run(_restart(tmp_path)) == 500
    stored = sqlite_ids(tmp_path / "audit.sqlite3")
    assert_exactly_once(ids, stored)
    assert len(stored) == 501
    # a clean close removed its own segment; the live one is still there
    assert sorted(p.name for p in (tmp_path / "journal").iterdir()) == [live.name]
    os.close(held)
    # the same rows replayed again (a crash between the database write and the unlink):
    # each is still stored once
    (tmp_path / "journal" / "1-1-1.wal").write_bytes(copy)
    assert asyncio.run(_restart(tmp_path)) == 500
    assert len(sqlite_ids(tmp_path / "audit.sqlite3")) == 502
    assert not list((tmp_path / "journal").iterdir())


async def _restart(d: Path) -> int:
    from fastrelay.audit.sqlite import SqliteAuditLog
    from fastrelay.events import Event

    log = SqliteAuditLog(d / "audit.sqlite3", d)
    await log.start()
    for _ in range(100):
        if log.stats.journal_replayed_rows:
            break
        await asyncio.sleep(0.05)
    assert log.record(Event("app1", ["x"], "after", "1"))
    await log.close()  # clean: everything durable, its own segment is removed
    return log.stats.journal_replayed_rows


def test_journal_refuses_when_no_segment_can_be_made(tmp_path: Path, monkeypatch: Any) -> None:
    """A full disk shows when a segment's blocks are reserved (never as SIGBUS on a store into
    the mapping): the append is refused, and what was appended before is still replayable."""
    import errno

    from fastrelay.audit.journal import Journal

    j = Journal(tmp_path / "journal", rotate_bytes=4096)
    j.open()
    rows = [b'[["id%d"]]' % i for i in range(400)]
    for r in rows[:100]:
        assert j.append(r)

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", full)
    results = [j.append(r) for r in rows[100:]]
    assert results.count(False) > 0 and all(results[:results.index(False)])
    appended = j.appended
    monkeypatch.undo()
    replayed = []
    for path in sorted((tmp_path / "journal").glob("*.wal"), key=lambda p: p.stat().st_mtime_ns):
        fd = os.open(path, os.O_RDONLY)
        replayed += Journal.read_rows(fd, path)
        os.close(fd)
    assert len(replayed) == appended  # every accepted row, none of the refused ones
    j.close(remove=True)
    assert not list((tmp_path / "journal").iterdir())


async def test_journal_rotates_and_releases(tmp_path: Path) -> None:
    from fastrelay.audit.journal import SPARES, Journal
    from fastrelay.audit.sqlite import SqliteAuditLog
    from fastrelay.events import Event

    log = SqliteAuditLog(tmp_path / "audit.sqlite3", tmp_path, journal_rotate_bytes=4096)
    log._journal.truncate_bytes = 1024
    await log.start()
    for _ in range(5):
        for _ in range(100):  # ~17 KB: the live segment is rotated when full
            assert log.record(Event("app1", ["y"], "r", "x" * 100))
        await log.flush()
        await log._in_io(lambda: None)  # recycling runs on the audit's I/O thread, in order
        segs = set((tmp_path / "journal").glob("*.wal"))
        # closed segments are recycled (SPARES at most) or deleted once durable; the live
        # one is rotated when caught up
        assert len(segs) <= 1 + SPARES and log._journal.size < 1024, segs
    # Past the first rotations no file is made: the live segment rotates into a recycled
    # one, whose pages are in the page cache already. A replay of it finds only its new
    # rows: the durable ones it held were zeroed.
    made = segs
    for i in range(6):
        for _ in range(10):  # ~1.7 KB: fits, past truncate_bytes
            assert log.record(Event("app1", ["y"], "r", "x" * 100))
        await log.flush()
        await log._in_io(lambda: None)
        assert set((tmp_path / "journal").glob("*.wal")) == made
        assert log.record(Event("app1", ["y"], f"new{i}", "x"))
        live = log._journal.path
        fd = os.open(live, os.O_RDONLY)
        try:
            assert [r[3] for r in Journal.read_rows(fd, live)] == [f"new{i}"]
        finally:
            os.close(fd)
    await log.close()
    assert not list((tmp_path / "journal").iterdir())


# ---------------------------------------------------------------- 1. kill -9 of a worker

def _stream_and_kill(relay: Any, channel: str, seconds: float, kill_at: float,
                     during_stall: Any, after_kill: Any) -> tuple[list[str], int]:
    """Posts for `seconds` (two threads); at kill_at kills one worker with SIGKILL."""
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def poster(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            eid = post_once(relay, channel, k * 1_000_000 + i)
            if eid is not None:
                with lock:
                    accepted.append(eid)

    threads = [threading.Thread(target=poster, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    sup = relay.proc.pid
    try:
        time.sleep(kill_at * 0.5)
        during_stall()
        time.sleep(kill_at * 0.5)
        workers = children(sup)
        assert len(workers) == 2, workers
        victim = workers[-1]
        os.kill(victim, signal.SIGKILL)
        after_kill()
        time.sleep(seconds - kill_at)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # the supervisor brings the slot back
    assert wait_for(lambda: len(children(sup)) == 2 and victim not in children(sup), 10)
    return accepted, victim


def _cluster_env(extra: dict[str, str]) -> dict[str, str]:
    return {"FASTRELAY_WORKERS": "2", "FASTRELAY_REDIS_URL": REDIS_URL,
            "FASTRELAY_KEY_PREFIX": f"reltest-{uid()}", "FASTRELAY_CLUSTER_SECRET": uid(),
            **extra}


def test_kill9_worker_loses_nothing_sqlite(fresh_relay: Any, tmp_path: Path) -> None:
    relay = fresh_relay(_cluster_env({}))
    db = tmp_path / "audit.sqlite3"
    assert wait_for(db.exists, 5)
    holder: list[sqlite3.Connection] = []

    def lock_db() -> None:
        # holds SQLite's write lock: the workers' batches wait, rows pile up unwritten
        conn = sqlite3.connect(db, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")
        holder.append(conn)

    def unlock_db() -> None:
        time.sleep(0.3)
        holder[0].execute("ROLLBACK")
        holder[0].close()

    accepted, victim = _stream_and_kill(relay, f"k9-{uid()}", 3.0, 1.6, lock_db, unlock_db)
    assert len(accepted) > 200
    assert wait_for(lambda: set(accepted) <= set(sqlite_ids(db)), 15)
    assert_exactly_once(accepted, sqlite_ids(db))
    log = relay.log()
    assert "rows from the journal" in log, log[-3000:]  # the killed worker's rows came back


def test_kill9_worker_loses_nothing_postgres(fresh_relay: Any, pg_proxy: ThreadProxy) -> None:
    app_id = f"rel{time.time_ns()}"
    relay = fresh_relay(_cluster_env({
        "FASTRELAY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/test",
        "FASTRELAY_APP_ID": app_id}))

    def heal() -> None:
        time.sleep(0.3)
        pg_proxy.cut()  # the stalled sessions are dead; new ones get through
        pg_proxy.restore()

    accepted, _ = _stream_and_kill(relay, f"k9pg-{uid()}", 3.0, 1.6, pg_proxy.stall, heal)
    assert len(accepted) > 200
    assert wait_for(lambda: set(accepted) <= set(pg_ids(app_id)), 20, 0.25)
    assert_exactly_once(accepted, pg_ids(app_id))
    assert "rows from the journal" in relay.log()


# ---------------------------------------------------------------- 2. PostgreSQL away mid-stream

def test_postgres_outage_mid_stream(fresh_relay: Any, pg_proxy: ThreadProxy) -> None:
    app_id = f"rel{time.time_ns()}"
    relay = fresh_relay({
        "FASTRELAY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/test",
        "FASTRELAY_APP_ID": app_id, "FASTRELAY_WORKERS": "1"})
    channel = f"pgout-{uid()}"
    accepted, answers = [], []
    t0 = time.monotonic()
    i = 0
    cut = restored = False
    while time.monotonic() - t0 < 3.0:
        el = time.monotonic() - t0
        if el > 0.8 and not cut:
            pg_proxy.cut()
            cut = True
        if el > 2.0 and not restored:
            pg_proxy.restore()
            restored = True
        i += 1
        eid = post_once(relay, channel, i)
        answers.append((el, eid is not None))
        if eid is not None:
            accepted.append(eid)
    during = [ok for el, ok in answers if 0.9 < el < 1.9]
    assert during and all(during), "intake stopped answering 202 while PostgreSQL was away"
    assert wait_for(lambda: set(accepted) <= set(pg_ids(app_id)), 20, 0.25)
    assert_exactly_once(accepted, pg_ids(app_id))


# ---------------------------------------------------------------- 2. slow consumer

def _ws_raw(relay: Any, rcvbuf: int | None = None) -> tuple[socket.socket, bytearray]:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect((relay.host, relay.port))
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    s.sendall((f"GET /app/{relay.key}?protocol=7&client=js&version=8.4.0 HTTP/1.1\r\n"
               f"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = bytearray()
    assert read_http_response(s, buf).status == 101
    return s, buf


def test_slow_consumer_is_cut_others_keep_up(fresh_relay: Any) -> None:
    relay = fresh_relay({"FASTRELAY_MAX_OUTBOUND_BUFFER": "262144", "FASTRELAY_WORKERS": "1"})
    channel = f"slow-{uid()}"
    # the slow one: a tiny receive window, subscribes, then never reads again
    from wsclient import build_frame
    slow, _ = _ws_raw(relay, rcvbuf=4096)
    time.sleep(0.1)
    slow.sendall(build_frame(json.dumps({"event": "pusher:subscribe",
                                         "data": {"channel": channel}})))
    good = connect(relay)
    good.subscribe(channel)
    time.sleep(0.2)
    rss0 = rss_kib(relay.proc.pid)
    n_batches, per = 80, 10  # 800 events of 10 KB: more than the kernel buffers + the cap
    got: list[float] = []
    lat: list[float] = []
    done = threading.Event()

    def reader() -> None:
        while len(got) < n_batches * per:
            m = good.recv(timeout=10)
            if m.get("event") == "big":
                now = time.time()
                got.append(now)
                lat.append(now - float(m["raw_data"][:20]))
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    pad = "x" * 10_000
    for _b in range(n_batches):
        batch = [{"channel": channel, "name": "big", "data": f"{time.time():<20.6f}{pad}"}
                 for _ in range(per)]
        r = api(relay, "POST", f"/apps/{relay.app_id}/batch_events", {"batch": batch})
        assert r.status == 200, r.body
    assert done.wait(15), f"the normal subscriber got {len(got)} of {n_batches * per}"
    lat.sort()
    assert lat[len(lat) // 2] < 0.25 and lat[-1] < 2.0, (lat[len(lat) // 2], lat[-1])
    # the slow one was closed by the server: 4100 (or, if its close frame could not be
    # queued behind the full buffer, just the end of the stream)
    slow.settimeout(5)
    buf, code = bytearray(), None
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            chunk = slow.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
            while (f := parse_frame(buf)) is not None:
                frame, used = f
                del buf[:used]
                if frame.opcode == 8:
                    code = frame.close_code
    except (ConnectionResetError, TimeoutError):
        pass
    assert code in (4100, None)
    assert wait_for(lambda: not _still_connected(relay, channel, 2), 3), "slow one not cut"
    rss1 = rss_kib(relay.proc.pid)
    print(f"slow consumer: RSS {rss0} -> {rss1} KiB; latency p50 {lat[len(lat) // 2]:.4f} s "
          f"max {lat[-1]:.4f} s; close code {code}")
    assert rss1 - rss0 < 48 * 1024, (rss0, rss1)  # bounded: not the 8 MB it was sent
    slow.close()
    good.close()


def _still_connected(relay: Any, channel: str, n: int) -> bool:
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels/{channel}",
            params={"info": "subscription_count"})
    return r.json().get("subscription_count", 0) >= n


# ---------------------------------------------------------------- 2. secrets

def test_secrets_never_in_logs_or_errors(fresh_relay: Any, tmp_path: Path) -> None:
    app_secret = f"appsecret{uid()}{uid()}"
    cluster_secret = f"clustersecret{uid()}{uid()}"
    env = {"FASTRELAY_APP_SECRET": app_secret, "FASTRELAY_CLUSTER_SECRET": cluster_secret,
           "FASTRELAY_LOG_LEVEL": "debug"}
    relay = fresh_relay(env)
    bodies: list[bytes] = []
    raw = json.dumps({"app_key": relay.key, "channel": "c", "event": "e", "data": 1}).encode()
    # intake: wrong secret, no signature, stale timestamp, garbage
    for h in (intake_headers("wrong" + app_secret, raw), {"Content-Type": "application/json"},
              {"X-Fastrelay-Timestamp": "1", "X-Fastrelay-Signature": "sha256=00"}):
        bodies.append(raw_request(relay, "POST", "/api/events", raw, h).body)
    bodies.append(raw_request(relay, "POST", "/api/events", b"{not json",
                              intake_headers(app_secret, b"{not json")).body)
    # the Pusher HTTP API: a bad signature, a wrong key
    ev = json.dumps({"name": "e", "channels": ["c"], "data": "1"}).encode()
    bodies.append(api(relay, "POST", f"/apps/{relay.app_id}/events", ev,
                      secret="wrong" + app_secret).body)
    bodies.append(api(relay, "POST", f"/apps/{relay.app_id}/events", ev, key="nokey").body)
    # WebSocket: bad private/presence auth, a bad sign-in, an unknown app key
    ws = connect(relay)
    frames: list[str] = []
    ws.send_json("pusher:subscribe", {"channel": "private-x", "auth": f"{relay.key}:00ff"})
    frames.append(json.dumps(ws.recv()))
    bad = sign_channel(relay.key, "wrong" + app_secret, ws.socket_id, "presence-x", '{"user_id":"1"}')
    ws.send_json("pusher:subscribe", {"channel": "presence-x", "auth": bad,
                                      "channel_data": '{"user_id":"1"}'})
    frames.append(json.dumps(ws.recv()))
    ws.send_json("pusher:signin", {"auth": f"{relay.key}:00", "user_data": '{"id":"1"}'})
    try:
        frames.append(json.dumps(ws.recv(timeout=2)))
    except (AssertionError, TimeoutError) as e:
        frames.append(str(e))
    ws.close()
    bad_key = open_ws(relay, key="no-such-key")
    try:
        frames.append(json.dumps(bad_key.recv()))
    except AssertionError as e:
        frames.append(str(e))
    # a config error at start, with both secrets in the environment
    penv = {**relay.env, "FASTRELAY_PORT": "not-a-port", "FASTRELAY_WORKERS": "-3"}
    cfg_err = subprocess.run([sys.executable, "-m", "fastrelay", "serve"], env=penv,
                             capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert cfg_err.returncode != 0
    doctor = subprocess.run([sys.executable, "-m", "fastrelay", "doctor"], env=relay.env,
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    text = "\n".join([relay.log(), *(b.decode("utf-8", "replace") for b in bodies), *frames,
                      cfg_err.stdout, cfg_err.stderr, doctor.stdout, doctor.stderr])
    assert len(bodies) == 6 and all(bodies)
    for secret in (app_secret, cluster_secret):
        assert secret not in text
        assert secret[:16] not in text  # not even a prefix


# ---------------------------------------------------------------- 2. connection limits

def test_node_max_connections_4100_and_slow_handshake(fresh_relay: Any) -> None:
    # per-app limits (4004), channels per connection, HTTP slowloris and size limits are in
    # test_protocol.py / test_http_api.py; these are the node cap and a WebSocket upgrade
    # that never finishes
    relay = fresh_relay({"FASTRELAY_MAX_CONNECTIONS": "3", "FASTRELAY_REQUEST_TIMEOUT": "0.5",
                         "FASTRELAY_SWEEP_INTERVAL": "0.2", "FASTRELAY_WORKERS": "1"})
    held = [connect(relay) for _ in range(3)]
    extra = open_ws(relay)
    extra.expect_error_close(4100)
    extra.close()  # a refused socket counts until its close handshake ends (closing_timeout)
    held.pop().close()
    time.sleep(0.3)
    held.append(connect(relay))  # the slot is free again
    with socket.create_connection((relay.host, relay.port), timeout=3) as s:
        t0 = time.monotonic()
        s.sendall(f"GET /app/{relay.key}?protocol=7 HTTP/1.1\r\nHost: x\r\n"
                  "Upgrade: websocket\r\n".encode())
        resp = read_http_response(s, bytearray(), timeout=3)
        assert resp.status == 408 and time.monotonic() - t0 < 2.0
    for w in held:
        w.close()


# ---------------------------------------------------------------- 2. memory across churn

def test_memory_flat_across_connection_churn(fresh_relay: Any) -> None:
    relay = fresh_relay({"FASTRELAY_WORKERS": "1"})
    pid = relay.proc.pid
    threads, warm, total = 4, 1000, 5000
    observers = []
    for k in range(threads):
        o = connect(relay)
        ch = f"presence-churn-{k}"
        cd = json.dumps({"user_id": f"obs{k}"})
        o.subscribe(ch, auth=sign_channel(relay.key, relay.secret, o.socket_id, ch, cd),
                    channel_data=cd)
        observers.append(o)
    errors: list[str] = []

    def cycles(k: int, n: int, base: int) -> None:
        ch = f"presence-churn-{k}"
        obs = observers[k]
        try:
            for i in range(n):
                w = connect(relay)
                cd = json.dumps({"user_id": f"u{k}-{base + i}", "user_info": {"i": i}})
                w.subscribe(ch, auth=sign_channel(relay.key, relay.secret, w.socket_id, ch,
                                                  cd), channel_data=cd)
                w.send_json({"event": "client-hi", "channel": ch, "data": {"i": i}})
                if i % 3 == 0:
                    w.send_json("pusher:unsubscribe", {"channel": ch})
                w.close()
                if i % 50 == 0:
                    _drain(obs)
            _drain(obs)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def run(n: int, base: int) -> None:
        ts = [threading.Thread(target=cycles, args=(k, n // threads, base))
              for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    run(warm, 0)
    time.sleep(0.5)
    rss_warm = rss_kib(pid)
    run(total - warm, warm)
    time.sleep(0.5)
    rss_end = rss_kib(pid)
    assert not errors, errors[:3]
    for o in observers:
        o.close()
    print(f"churn RSS: after warm-up {rss_warm} KiB, after {total} cycles {rss_end} KiB")
    assert rss_end - rss_warm < 6 * 1024, (rss_warm, rss_end)  # KiB
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels")
    assert wait_for(lambda: api(relay, "GET", f"/apps/{relay.app_id}/channels").json()
                    == {"channels": {}}, 3), r.body


def _drain(ws: Any) -> None:
    try:
        while True:
            ws.recv(timeout=0.001)
    except TimeoutError:
        pass
    except Closed:
        raise


async def test_journal_of_a_process_that_dies_later_is_picked_up(tmp_path: Path) -> None:
    """A live worker adopts the journal of one that died after it started (no restart of
    that slot: e.g. the old generation after a reload, killed before it could flush)."""
    from fastrelay.audit.sqlite import SqliteAuditLog

    log = SqliteAuditLog(tmp_path / "audit.sqlite3", tmp_path)
    log.orphan_scan_interval = 0.2
    await log.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, str(tmp_path), "100", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    ids = out.decode().split()
    assert len(ids) == 100
    for _ in range(100):
        if log.stats.journal_replayed_rows == 100:
            break
        await asyncio.sleep(0.05)
    await log.close()
    assert log.stats.journal_replayed_rows == 100
    assert_exactly_once(ids, sqlite_ids(tmp_path / "audit.sqlite3"))
    assert not list((tmp_path / "journal").iterdir())


def test_journal_frames_match_the_spill_format() -> None:
    """The journal's C writer lays frames out exactly as spill.frame does, so one reader
    (read_frame) replays both; a frame that does not fit is refused whole."""
    from fastrelay.audit._journal import FrameWriter
    from fastrelay.audit.spill import frame

    payloads = [b'[["a"]]', b'[["' + "é\u2603".encode() * 50 + b'"]]', b"x" * 300]
    buf = bytearray(8 + 7 + 8 + len(payloads[1]) + 10)
    w = FrameWriter(buf)
    assert w.put(payloads[0]) and w.put(payloads[1])
    assert not w.put(payloads[2])  # does not fit: nothing written
    assert bytes(buf[:w.size]) == frame(payloads[0]) + frame(payloads[1])
    assert not any(buf[w.size:])
    w.release()
    buf.append(0)  # the view is released: the buffer can change size again


def test_journal_refuses_an_empty_payload(tmp_path: Path) -> None:
    """A zero length marks the end of a segment's frames, so an empty payload is refused
    (the event would be answered 503), never counted as journaled without being written."""
    from fastrelay.audit.journal import Journal

    j = Journal(tmp_path / "journal", rotate_bytes=4096)
    j.open()
    assert j.append(b'[["a"]]') and not j.append(b"") and j.appended == 1
    j.close(remove=True)


def test_sqlite_writer_child_dies_with_its_worker(tmp_path: Path) -> None:
    """A writer child outliving its killed worker could commit a batch after the next worker
    replayed the same rows from the journal (stored twice): it is killed with its parent.
    Its input stays open here (the test holds the pipe), as it would while the child is busy
    with a batch: end of input alone would not stop it."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"c = subprocess.Popen([sys.executable, '-m', 'fastrelay.audit.sqlite_writer', "
        f"{str(tmp_path / 'a.sqlite3')!r}, str(os.getpid())])\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(60)\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert wait_for(lambda: (tmp_path / "a.sqlite3").exists(), 10)  # the writer is up
    parent.kill()
    parent.wait()

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] == "Z"
        except OSError:
            return True

    try:
        assert wait_for(gone, 5)
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
