"""Audit log against real SQLite (tmp dir) and the real PostgreSQL on 127.0.0.1:5432.

PostgreSQL outages are simulated with a TCP proxy owned by the test (cut = close every
connection and refuse new ones) and with pg_terminate_backend on our own application_name;
the shared server itself is never touched. Each test uses its own random schema.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from pgproxy import PgProxy

from fastrelay._core import event_id_floor
from fastrelay.audit import AuditLog, open_audit
from fastrelay.audit import sqlite as audit_sqlite
from fastrelay.audit._sqlite import BATCH_ROWS, Poison, Transient, Writer, pack
from fastrelay.audit.spill import SpillFile
from fastrelay.audit.sqlite import _SCHEMA
from fastrelay.events import Event

PG_URL = os.environ.get("FASTRELAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
DAY = 86_400


@pytest.fixture
async def proxy() -> AsyncIterator[PgProxy]:
    p = PgProxy()
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    schema = "audit_test_" + os.urandom(5).hex()
    yield schema
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


MakeLog = Callable[..., AuditLog]
PG_ONLY = pytest.mark.parametrize("make_log", ["postgres"], indirect=True)


@pytest.fixture(params=["sqlite", "postgres"])
async def make_log(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str,
                   proxy: PgProxy) -> AsyncIterator[MakeLog]:
    """Factory for audit logs of the parametrized backend; all are closed afterwards."""
    logs: list[AuditLog] = []

    def make(via_proxy: bool = False, data_dir: Path | None = None, **kw: Any) -> AuditLog:
        kw.setdefault("maintenance_interval", 0)
        if request.param == "postgres":
            url = (f"postgresql://postgres@127.0.0.1:{proxy.port}/test" if via_proxy
                   else PG_URL)
            kw.setdefault("application_name", pg_schema)
            kw.setdefault("connect_timeout", 1.0)
            log = open_audit(url, data_dir or tmp_path, schema=pg_schema, **kw)
        else:
            log = open_audit(None, data_dir or tmp_path, **kw)
        logs.append(log)
        return log

    make.backend = request.param  # type: ignore[attr-defined]
    yield make
    for log in logs:
        await log.close()


def ev(app: str = "app", channels: list[str] | None = None, name: str = "e", i: int = 0,
       accepted_at: float | None = None) -> Event:
    """An event, accepted now or at `accepted_at`, whose id then says that time (ids start
    with 12 hex digits of ms), as a real one's would: SQLite batches and retention go by it."""
    eid = None if accepted_at is None else f"{int(accepted_at * 1000):012x}{os.urandom(8).hex()[:15]}"
    return Event(app, channels or ["c"], name, f'{{"i":{i}}}', socket_id="1.2", source="api",
                 id=eid, accepted_at=accepted_at)


async def count_all(log: AuditLog, app: str = "app") -> list[str]:
    """All ids of an app, oldest first, walking pages."""
    out: list[str] = []
    before = None
    while True:
        page = await log.query(app, limit=1000, before=before)
        if not page:
            return out[::-1]
        out.extend(r["id"] for r in page)
        before = page[-1]["id"]


async def test_round_trip_filters_and_pagination(make_log: MakeLog) -> None:
    log = make_log()
    await log.start()
    t0 = time.time() - 100
    events = []
    for i in range(30):
        e = ev(channels=["a", "b"] if i % 3 == 0 else ["b"], name="x" if i % 2 else "y", i=i,
               accepted_at=t0 + i)
        events.append(e)
        assert log.record(e)
    other = ev(app="other", channels=["a"])
    assert log.record(other)
    original = events[5]
    replay = Event("app", ["b"], "y", original.data, source="replay")
    assert log.record(replay, replay_of=original.id)
    await log.flush()
    assert log.queue_depth == 0
    assert log.stats.rows_written == 32 and log.stats.batches >= 1

    ids = [e.id for e in events] + [replay.id]
    rows = await log.query("app", limit=1000)
    assert [r["id"] for r in rows] == ids[::-1]
    first = await log.get("app", events[0].id)
    assert first is not None
    assert first["channels"] == ["a", "b"] and first["name"] == "y"
    assert first["data"] == '{"i":0}' and first["socket_id"] == "1.2"
    assert first["source"] == "api" and first["replay_of"] is None
    assert abs(first["accepted_at"] - t0) < 1e-3
    got = await log.get("app", replay.id)
    assert got is not None and got["replay_of"] == original.id and got["source"] == "replay"
    assert await log.get("other", events[0].id) is None  # ids are scoped by app
    assert await log.get("app", "nope") is None

    # channel, event name and time filters
    a = await log.query("app", channel="a")
    assert [r["id"] for r in a] == [e.id for e in events if "a" in e.channels][::-1]
    assert [r["id"] for r in await log.query("other", channel="a")] == [other.id]
    x = await log.query("app", event="x")
    assert [r["id"] for r in x] == [e.id for e in events if e.name == "x"][::-1]
    ay = await log.query("app", channel="a", event="y")
    assert [r["id"] for r in ay] == [e.id for e in events if e.name == "y" and
                                     "a" in e.channels][::-1]
    window = await log.query("app", since=t0 + 10, until=t0 + 20)
    assert [r["id"] for r in window] == [e.id for e in events[10:20]][::-1]
    assert await log.query("app", channel="zzz") == []

    # pagination by id cursor, with and without a filter
    seen, before = [], None
    while page := await log.query("app", limit=7, before=before):
        assert len(page) <= 7
        seen.extend(r["id"] for r in page)
        before = page[-1]["id"]
    assert seen == ids[::-1]
    seen, before = [], None
    while page := await log.query("app", channel="b", limit=4, before=before):
        seen.extend(r["id"] for r in page)
        before = page[-1]["id"]
    assert seen == [e.id for e in events if "b" in e.channels][::-1] or \
        seen == ([replay.id] + [e.id for e in events if "b" in e.channels][::-1])
    assert seen[0] == replay.id


async def test_record_refuses_when_queue_full(make_log: MakeLog) -> None:
    log = make_log(queue_size=5)
    await log.start()
    # No await between records: the writer cannot drain, so the bound is hit exactly.
    assert all(log.record(ev(i=i)) for i in range(5))
    assert log.queue_depth == 5
    assert log.record(ev(i=5)) is False
    assert log.stats.refused == 1
    await log.flush()
    assert log.queue_depth == 0
    assert log.record(ev(i=6))
    await log.flush()
    assert len(await count_all(log)) == 6


async def test_same_event_twice_returned_once(make_log: MakeLog) -> None:
    log = make_log()
    await log.start()
    e = ev()
    assert log.record(e)
    await log.flush()
    assert log.record(e)  # e.g. a batch retried after an ambiguous timeout
    await log.flush()
    assert await count_all(log) == [e.id]
    assert log.stats.rows_written == 2  # both attempts committed, the second inserted nothing


async def test_close_flushes(make_log: MakeLog, tmp_path: Path) -> None:
    log = make_log(flush_interval=10.0, batch_rows=100_000)  # only close() will write
    await log.start()
    events = [ev(i=i) for i in range(500)]
    for e in events:
        assert log.record(e)
    await log.close()
    assert log.record(ev()) is False  # closed logs refuse
    log2 = make_log()
    await log2.start()
    assert await count_all(log2) == [e.id for e in events]


async def test_leftover_spill_is_replayed_on_start(make_log: MakeLog, tmp_path: Path) -> None:
    events = [ev(i=i, channels=["s"]) for i in range(250)]
    rows = [[e.id, e.app_id, e.channels, e.name, e.data, e.socket_id, e.source,
             e.accepted_at, e.user_id, None] for e in events]
    spill = SpillFile(tmp_path / "audit.spill")
    spill.open()
    for i in range(0, 250, 100):
        spill.append(rows[i:i + 100])
    spill.append(rows[:10])  # a frame that was already written: must not duplicate
    spill.close()
    with open(tmp_path / "audit.spill", "ab") as f:
        f.write(b"\x00\x00\x01\x00torn")  # crash mid-append
    log = make_log()
    await log.start()
    assert log.spill_pending_rows == 260
    assert await log.wait_written_back(timeout=10)
    assert await count_all(log) == [e.id for e in events]
    assert (tmp_path / "audit.spill").stat().st_size == 0
    assert log.stats.replayed_rows == 260
    assert list(tmp_path.glob("audit.spill.bad-*"))  # the torn tail is kept for a human


async def test_retention(make_log: MakeLog) -> None:
    log = make_log(retention_days=7)
    await log.start()
    now = time.time()
    old = [ev(i=i, accepted_at=now - 10 * DAY + i) for i in range(5)]
    new = [ev(i=i, accepted_at=now - 1 * DAY + i) for i in range(5)]
    for e in old + new:
        assert log.record(e)
    await log.flush()
    assert len(await count_all(log)) == 10
    if make_log.backend == "postgres":  # type: ignore[attr-defined]
        parts = await log.partitions()  # type: ignore[attr-defined]
        assert len(parts) >= 5  # yesterday, today, ahead, and the old day
        dropped = await log.apply_retention(now=now)
        assert dropped == 1
        after = await log.partitions()  # type: ignore[attr-defined]
        assert len(after) == len(parts) - 1
        old_day = time.strftime("%Y%m%d", time.gmtime(now - 10 * DAY))
        assert not any(p.endswith(old_day) for p in after)
    else:
        assert await log.apply_retention(now=now) == 5
    assert await count_all(log) == [e.id for e in new]
    assert await log.query("app", channel="c") != []
    # nothing older than retention left, so a second pass is a no-op
    assert await log.apply_retention(now=now) == 0


async def _stream(log: AuditLog, n: int, sent: list[Event], rate_sleep: float = 0.001) -> None:
    for i in range(n):
        e = ev(i=i, channels=["s", f"s{i % 3}"])
        assert log.record(e)
        sent.append(e)
        if i % 20 == 0:
            await asyncio.sleep(rate_sleep)


@PG_ONLY
async def test_pg_outage_via_proxy_then_back(make_log: MakeLog, proxy: PgProxy) -> None:
    log = make_log(via_proxy=True, retry_interval=0.05, max_retry_interval=0.2)
    await log.start()
    sent: list[Event] = []
    task = asyncio.create_task(_stream(log, 3000, sent))
    while len(sent) < 800:
        await asyncio.sleep(0.005)
    proxy.cut()
    while len(sent) < 2000:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.3)  # a few retries fail while the proxy refuses
    spilled_during_outage = log.stats.spilled_rows
    proxy.restore()
    await task
    assert await log.wait_written_back(timeout=20)
    assert spilled_during_outage > 0
    assert log.stats.replayed_rows > 0 and log.spill_pending_rows == 0
    assert log.healthy
    # every event exactly once, ids in recording order
    assert await count_all(log) == [e.id for e in sent]
    conn = await asyncpg.connect(PG_URL)
    try:
        n, distinct = await conn.fetchrow(
            f"SELECT count(*), count(DISTINCT id) FROM {log.schema}.audit_events")  # type: ignore[attr-defined]
    finally:
        await conn.close()
    assert n == distinct == 3000


@PG_ONLY
async def test_pg_backends_terminated(make_log: MakeLog) -> None:
    log = make_log(retry_interval=0.05, max_retry_interval=0.2)
    await log.start()
    app_name = log.application_name  # type: ignore[attr-defined]
    sent: list[Event] = []
    task = asyncio.create_task(_stream(log, 2000, sent))
    killer = await asyncpg.connect(PG_URL)
    try:
        for _ in range(3):
            while len(sent) < 500 * (_ + 1):
                await asyncio.sleep(0.002)
            await killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1", app_name)
    finally:
        await killer.close()
    await task
    assert await log.wait_written_back(timeout=20)
    assert await count_all(log) == [e.id for e in sent]


@PG_ONLY
async def test_pg_down_at_start_spills_then_writes_back(make_log: MakeLog,
                                                        proxy: PgProxy) -> None:
    proxy.cut()
    log = make_log(via_proxy=True, retry_interval=0.05, max_retry_interval=0.2)
    await log.start()  # does not fail: events are kept on disk meanwhile
    assert not log.healthy
    events = [ev(i=i) for i in range(100)]
    for e in events:
        assert log.record(e)
    await log.flush()  # durable in the spill file
    assert log.spill_pending_rows == 100
    proxy.restore()
    assert await log.wait_written_back(timeout=20)
    assert await count_all(log) == [e.id for e in events]


@PG_ONLY
async def test_close_while_pg_down_keeps_spill_for_next_start(make_log: MakeLog,
                                                              proxy: PgProxy,
                                                              tmp_path: Path) -> None:
    log = make_log(via_proxy=True, retry_interval=5, max_retry_interval=5)
    await log.start()
    proxy.cut()
    events = [ev(i=i) for i in range(50)]
    for e in events:
        assert log.record(e)
    await log.close()
    assert (tmp_path / "audit.spill").stat().st_size > 0
    proxy.restore()
    log2 = make_log()
    await log2.start()
    assert await log2.wait_written_back(timeout=20)
    assert await count_all(log2) == [e.id for e in events]


async def test_pg_nul_in_data_is_stored(make_log: MakeLog) -> None:
    log = make_log()
    await log.start()
    e = Event("app", ["c"], "n", "a\x00b")
    assert log.record(e)
    await log.flush()
    row = await log.get("app", e.id)
    assert row is not None and row["data"] in ("a\x00b", "a\ufffdb")
    assert log.stats.rejected_rows == 0


async def test_invalid_rows_are_rejected_not_blocking(make_log: MakeLog,
                                                       tmp_path: Path) -> None:
    log = make_log()
    await log.start()
    good = [ev(i=i) for i in range(20)]
    surrogate = Event("app", ["c"], "n", "bad \ud800 data")  # no UTF-8 encoding exists
    malformed = Event("app", None, "n", "x")  # type: ignore[arg-type]
    for e in good[:10] + [surrogate, malformed] + good[10:]:
        assert log.record(e)
    await log.flush()
    assert await count_all(log) == [e.id for e in good]
    assert log.stats.rejected_rows == 2
    lines = (tmp_path / "audit.rejected.jsonl").read_text().splitlines()
    assert len(lines) == 2 and any(surrogate.id in line for line in lines)
    assert log.healthy  # later events still go straight to the database
    later = ev()
    log.record(later)
    await log.flush()
    assert await log.get("app", later.id) is not None


@PG_ONLY
async def test_pg_stalled_network_times_out_and_spills(make_log: MakeLog,
                                                       proxy: PgProxy) -> None:
    log = make_log(via_proxy=True, write_timeout=0.5, retry_interval=0.05,
                   max_retry_interval=0.2)
    await log.start()
    before = [ev(i=i) for i in range(10)]
    for e in before:
        log.record(e)
    await log.flush()
    proxy.stalled = True  # a partition: no RST, packets just vanish
    during = [ev(i=i) for i in range(10, 110)]
    for e in during:
        assert log.record(e)
    t0 = time.monotonic()
    await log.flush()  # bounded by write_timeout, then durable in the spill file
    assert time.monotonic() - t0 < 5
    assert log.stats.spilled_rows >= 100 and log.stats.write_errors >= 1
    proxy.cut()  # drop the stalled connections, as TCP keepalive eventually would
    proxy.restore()
    assert await log.wait_written_back(timeout=20)
    assert await count_all(log) == [e.id for e in before + during]


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_sqlite_writer_process_killed_loses_nothing(make_log: MakeLog) -> None:
    """The SQLite batches are committed by a child process; if it dies, the batch it held
    spills and is written back through a new one, each row once."""
    log = make_log(flush_interval=0.001, batch_rows=50)
    await log.start()
    events = [ev(i=i) for i in range(2000)]
    for i, e in enumerate(events):
        assert log.record(e)
        if i % 100 == 99:
            await asyncio.sleep(0.002)
        if i == 1000:
            writer = log._writer  # type: ignore[attr-defined]
            assert writer is not None and writer._proc is not None
            writer._proc.kill()
    assert await log.wait_written_back(10)
    assert await count_all(log) == [e.id for e in events]
    assert log.stats.write_errors >= 1  # the kill was seen, not dodged


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_sqlite_batch_is_packed_in_steps_and_committed_whole(
        make_log: MakeLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker packs a batch PACK_ROWS rows at a time (yielding to its loop between
    steps) into one request: every row lands once, in batches of at most PACK_ROWS."""
    monkeypatch.setattr("fastrelay.audit.sqlite.PACK_ROWS", 3)
    log = make_log(batch_rows=1000)
    await log.start()
    events = [ev(i=i) for i in range(10)]
    assert all(log.record(e) for e in events)
    await log.flush()
    assert log.stats.batches == 1  # one request: one transaction
    assert await count_all(log) == [e.id for e in events]
    with sqlite3.connect(log.path) as db:  # type: ignore[attr-defined]
        counts = [c for (c,) in db.execute("SELECT count FROM audit_batches ORDER BY seq")]
    assert counts == [3, 3, 3, 1]


def _row(i: int, **change: Any) -> list[Any]:
    r = {"id": f"018e0000{i:04d}", "app_id": "app", "channels": ["a", "b"], "name": "n",
         "data": "é", "socket_id": None, "source": "api", "accepted_at": 1.5 + i,
         "user_id": None, "replay_of": None}
    r.update(change)
    return list(r.values())


def test_sqlite_pack_groups_rows_and_refuses_invalid_ones() -> None:
    """pack (the worker's half): one batch per app and id prefix, at most BATCH_ROWS rows, in
    id order whatever order the rows came in; an invalid row refuses the whole request."""
    rows = ([_row(i) for i in range(5)] + [_row(1, app_id="other", id="018e0000x")]
            + [_row(9, id="018e0001a")]  # the next prefix
            + [_row(7, channels=["z"]), _row(6)])  # out of order
    request = pack(rows)
    n = int.from_bytes(request[:4], "little")
    heads = orjson.loads(request[4:4 + n])
    body, off, batches = request[4 + n:], 0, []
    for *_, nbytes in heads:
        batches.append(orjson.loads(body[off:off + nbytes]))
        off += nbytes
    assert off == len(body)
    assert [h[:3] + h[5:7] for h in heads] == [
        ["app", "018e00000000", "018e00000007", 7, ["a", "b", "z"]],
        ["app", "018e0001a", "018e0001a", 1, ["a", "b"]],
        ["other", "018e0000x", "018e0000x", 1, ["a", "b"]]]
    assert heads[0][3:5] == [1.5, 8.5] and [h[7] for h in heads] == [["n"]] * 3
    assert [r[0] for r in batches[0]] == [f"018e0000{i:04d}" for i in (0, 1, 2, 3, 4, 6, 7)]
    assert batches[0][0] == _row(0) and batches[2] == [_row(1, app_id="other", id="018e0000x")]
    many = pack([_row(i) for i in range(BATCH_ROWS + 1)])
    assert [h[5] for h in orjson.loads(many[4:4 + int.from_bytes(many[:4], "little")])] == [
        BATCH_ROWS, 1]
    for bad in ([_row(3), _row(4, name=None)],          # not null
                [_row(3), _row(4, data={"x": 1})],      # not text
                [_row(3), _row(4, accepted_at="now")],  # not a number
                [_row(3), _row(4)[:9]],                 # a column short
                [_row(3), _row(4, channels="a")],       # channels is a list
                [_row(3), _row(4, id="é")]):            # ids are ASCII
        with pytest.raises(Poison):
            pack(bad)
    with pytest.raises(TypeError):
        pack([_row(3, data="\ud800")])  # no UTF-8 encoding exists


def test_sqlite_writer_commits_whole_requests_and_sorts_errors(tmp_path: Path) -> None:
    """The writer child's C insert loop: a request commits whole or not at all; a malformed
    request raises Poison (the caller isolates its rows), a database problem raises Transient
    (it spills)."""
    path = tmp_path / "audit.db"
    missing = Writer(str(path))  # no schema yet: not the rows' fault
    with pytest.raises(Transient):
        missing.write(pack([_row(0)]))
    missing.close()
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA)
    w = Writer(str(path))
    w.write(pack([_row(1), _row(2, socket_id="1.2", user_id="u", name="m")]))
    good = pack([_row(5)])
    n = int.from_bytes(good[:4], "little")
    w.write(pack([]))  # nothing to write: a valid request all the same
    for bad in (good[:3], good[:-1], good + b"x", good[:4] + b"{" + good[5:],
                b"\x02\x00\x00\x00{}", good[:4 + n]):
        with pytest.raises(ValueError):  # Poison, or JSONDecodeError
            w.write(bad)
    two = pack([_row(3), _row(4, app_id="other")])
    hlen = int.from_bytes(two[:4], "little")
    heads = orjson.loads(two[4:4 + hlen])
    heads[1][5] = "many"  # the second batch is malformed: the first is rolled back with it
    head = orjson.dumps(heads)
    with pytest.raises(Poison):
        w.write(len(head).to_bytes(4, "little") + head + two[4 + hlen:])
    w.write(good)  # each refusal rolled back: the writer goes on
    # packs back to back (the worker packs a big batch in steps) commit together, or not
    # at all: a malformed second pack rolls back the first
    with pytest.raises(Poison):
        w.write(pack([_row(8)]) + len(head).to_bytes(4, "little") + head + two[4 + hlen:])
    w.write(pack([_row(6)]) + pack([_row(7)]))
    w.close()
    with sqlite3.connect(path) as db:
        batches = db.execute("SELECT app_id, first_id, last_id, first_at, last_at, count, "
                             "channels, names, rows FROM audit_batches ORDER BY seq").fetchall()
        chans = db.execute("SELECT * FROM audit_batch_channels ORDER BY 2, 4").fetchall()
        names = db.execute("SELECT * FROM audit_batch_names ORDER BY 2, 4").fetchall()
    assert [b[:8] for b in batches] == [
        ("app", "018e00000001", "018e00000002", 2.5, 3.5, 2, '["a","b"]', '["m","n"]'),
        ("app", "018e00000005", "018e00000005", 6.5, 6.5, 1, '["a","b"]', '["n"]'),
        ("app", "018e00000006", "018e00000006", 7.5, 7.5, 1, '["a","b"]', '["n"]'),
        ("app", "018e00000007", "018e00000007", 8.5, 8.5, 1, '["a","b"]', '["n"]')]
    assert orjson.loads(batches[0][8]) == [_row(1),
                                           _row(2, socket_id="1.2", user_id="u", name="m")]
    lasts = (("018e00000002", 1), ("018e00000005", 2), ("018e00000006", 3),
             ("018e00000007", 4))
    assert chans == [("app", ch, last, seq) for ch in "ab" for last, seq in lasts]
    assert names == [("app", "m", "018e00000002", 1)] + [("app", "n", *ls) for ls in lasts]


# schema version 2 (one row per event), as files made before batches hold it
_SCHEMA_V2 = """
CREATE TABLE audit_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);
INSERT INTO audit_schema_version VALUES (2, 0);
CREATE TABLE audit_events (
    id TEXT PRIMARY KEY, app_id TEXT NOT NULL, channels TEXT NOT NULL, name TEXT NOT NULL,
    data TEXT NOT NULL, socket_id TEXT, source TEXT NOT NULL, accepted_at REAL NOT NULL,
    user_id TEXT, replay_of TEXT);
CREATE INDEX audit_events_app_id ON audit_events (app_id, id);
CREATE TABLE audit_event_channels (
    app_id TEXT NOT NULL, channel TEXT NOT NULL, event_id TEXT NOT NULL,
    PRIMARY KEY (app_id, channel, event_id)) WITHOUT ROWID;
"""


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_sqlite_version_2_file_migrates_to_batches(make_log: MakeLog,
                                                         tmp_path: Path) -> None:
    """A file of schema version 2 (a row per event) moves into batches on open, every field
    intact (accepted_at to the last bit), grouped as the writer groups new rows; the view
    audit_events still shows a row per event."""
    # an hour ago, at the start of an id prefix's 65.5 s (2**16 ms), so the batches are known
    t0 = (((int(time.time() * 1000) >> 16) - 55) << 16) / 1000 + 1
    events = ([ev(i=i, channels=["a", "b"] if i % 3 else ["a"], name=f"n{i % 2}",
                  accepted_at=t0 + i * 0.001) for i in range(BATCH_ROWS + 200)]
              + [ev(app="other", i=i, accepted_at=t0 + 10 + i) for i in range(3)])
    events[7].user_id = "u7"
    with sqlite3.connect(tmp_path / "audit.sqlite3") as db:
        db.executescript(_SCHEMA_V2)
        for e in events:
            row = e.audit_row(None)
            db.execute("INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       row[:2] + (orjson.dumps(row[2]).decode(),) + row[3:])
            db.executemany("INSERT INTO audit_event_channels VALUES (?, ?, ?)",
                           [(e.app_id, ch, e.id) for ch in e.channels])
    log = make_log()
    await log.start()
    app_events = events[:-3]
    assert await count_all(log) == sorted(e.id for e in app_events)
    assert await count_all(log, "other") == [e.id for e in events[-3:]]
    got = await log.get("app", events[7].id)
    assert got == {"id": events[7].id, "app_id": "app", "channels": ["a", "b"], "name": "n1",
                   "data": '{"i":7}', "socket_id": "1.2", "source": "api",
                   "accepted_at": events[7].accepted_at, "user_id": "u7", "replay_of": None}
    n0 = await log.query("app", event="n0", limit=1000)
    assert [r["id"] for r in n0] == sorted((e.id for e in app_events if e.name == "n0"),
                                           reverse=True)
    b = await log.query("app", channel="b", limit=1000)
    assert [r["id"] for r in b] == sorted((e.id for e in app_events if "b" in e.channels),
                                          reverse=True)[:1000]
    since = events[500].accepted_at
    assert [r["id"] for r in await log.query("app", since=since, limit=1000)] == sorted(
        (e.id for e in app_events if e.accepted_at >= since), reverse=True)
    with sqlite3.connect(tmp_path / "audit.sqlite3") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "audit_events" not in tables and "audit_event_channels" not in tables
        assert db.execute("SELECT max(version) FROM audit_schema_version").fetchone()[0] == 3
        counts = db.execute("SELECT app_id, count FROM audit_batches ORDER BY seq").fetchall()
        assert sorted(counts) == [("app", 200), ("app", BATCH_ROWS), ("other", 3)]
        assert db.execute("SELECT count(*), count(DISTINCT id) FROM audit_events "
                          "WHERE app_id = 'app'").fetchone() == (len(app_events),) * 2


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_sqlite_retention_walks_batches_in_commit_order(
        make_log: MakeLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention deletes whole batches, each once every row in it is old, in commit order
    without an index on time: an old batch committed late (a journal replay) goes once the
    batches around it are old too, and a newer batch in between does not stop the pass."""
    log = make_log(retention_days=7)
    await log.start()
    now = time.time()
    old = [ev(i=i, accepted_at=now - 10 * DAY + i) for i in range(3)]
    skewed = [ev(i=99, accepted_at=now - 2 * DAY)]  # committed between old batches: kept
    more_old = [ev(i=i, accepted_at=now - 9 * DAY + i) for i in range(3)]
    new = [[ev(i=i, accepted_at=now - DAY + i * 3600)] for i in range(3)]
    late = [ev(i=7, accepted_at=now - 20 * DAY)]  # a replayed journal's row, committed last
    for group in (old, skewed, more_old, *new, late):  # a batch each, in this order
        for e in group:
            assert log.record(e)
        await log.flush()
    monkeypatch.setattr(audit_sqlite, "_RETENTION_CHUNK", 2)  # the pass ends in a chunk of new
    assert await log.apply_retention(now=now) == 6
    assert await count_all(log) == [e.id for e in late + skewed + [g[0] for g in new]]
    assert await log.apply_retention(now=now + 7 * DAY) == 5  # all old now, the late row too
    assert await count_all(log) == []


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_sqlite_batches_of_two_workers_overlap_and_read_in_id_order(
        make_log: MakeLog, tmp_path: Path) -> None:
    """Two workers write one file; their batches' id ranges interleave. Every page, with and
    without a channel, is exactly the next newest ids, and each event is found by its id."""
    a, b = make_log(journal=False), make_log(journal=False)
    await a.start()
    await b.start()
    events = []
    for i in range(60):
        e = ev(channels=["odd" if i % 2 else "even", "all"], i=i)
        events.append(e)
        log = a if i % 2 else b
        assert log.record(e)
        if i % 10 == 9:
            await a.flush()  # a batch every 5 of a's events ...
        if i % 14 == 13:
            await b.flush()  # ... and every 7 of b's
        await asyncio.sleep(0.0005)
    await a.flush()
    await b.flush()
    with sqlite3.connect(tmp_path / "audit.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM audit_batches").fetchone()[0] >= 10
    for channel in (None, "all", "odd"):
        want = [e.id for e in events if channel in (None, *e.channels)][::-1]
        for limit in (1, 3, 7, 100):
            seen: list[str] = []
            before = None
            while page := await a.query("app", channel=channel, limit=limit, before=before):
                seen.extend(r["id"] for r in page)
                before = page[-1]["id"]
            assert seen == want, (channel, limit)
    for e in events:
        got = await b.get("app", e.id)
        assert got is not None and got["data"] == e.data


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_sqlite_replayed_rows_already_stored_are_skipped(make_log: MakeLog,
                                                               tmp_path: Path) -> None:
    """Rows that may be stored already (a journal replayed, a spill written back) are looked
    up first: each is stored once. Rows recorded again through the queue are not looked up
    (that costs a read per batch); the API returns them once all the same."""
    log = make_log()
    await log.start()
    events = [ev(i=i) for i in range(30)]
    for e in events:
        assert log.record(e)
    await log.flush()
    rows = [list(e.audit_row(None)) for e in events]
    assert await log._write_db(rows[10:] + [list(ev(i=99).audit_row(None))], again=True) == []
    await log._write_db(rows[:5])  # not `again`: written as they come
    with sqlite3.connect(tmp_path / "audit.sqlite3") as db:
        ids = [r[0] for r in db.execute("SELECT id FROM audit_events")]
    assert len(ids) == 36 and len(set(ids)) == 31
    assert len(await count_all(log)) == 31


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_since_is_exact_at_each_event(make_log: MakeLog) -> None:
    """`since` an event's own accepted_at returns it and every later one: the id bound the
    SQLite query starts from (ids sort by time) never cuts off a row the filter keeps.
    SQLite only: PostgreSQL keeps accepted_at in microseconds, so there an event a fraction
    of a microsecond before `since` can compare equal to it, and it has no id bound."""
    log = make_log()
    await log.start()
    events = []
    for i in range(40):
        events.append(ev(channels=["a"], i=i))
        assert log.record(events[-1])
        if i % 8 == 7:
            await asyncio.sleep(0.002)  # several milliseconds, so ids cross ms boundaries
    await log.flush()
    for k in (0, 7, 8, 23, 39):
        since = events[k].accepted_at
        want = [e.id for e in events if e.accepted_at >= since][::-1]
        assert [r["id"] for r in await log.query("app", since=since, limit=100)] == want
        assert [r["id"] for r in await log.query("app", channel="a", since=since,
                                                 limit=100)] == want
    assert await log.query("app", since=time.time() + 5) == []


def test_event_id_floor_is_below_every_later_id() -> None:
    for _ in range(2000):
        e = Event("app", ["c"], "n", "d")
        assert event_id_floor(e.accepted_at) <= e.id < event_id_floor(e.accepted_at + 1)


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_node_refuses_what_the_audit_cannot_take(make_log: MakeLog, tmp_path: Path) -> None:
    """An event is accepted only once queued for the audit: with the queue full, one event
    alone or a batch (checked whole) is refused before the bus, and counted."""
    from fastrelay.apps import AppManager
    from fastrelay.config import load
    from fastrelay.node import Node

    log = make_log(queue_size=3, flush_interval=60, batch_rows=1000)  # the writer waits
    await log.start()
    cfg = load(None, {"FASTRELAY_DATA_DIR": str(tmp_path)})
    node = Node(cfg, AppManager(cfg.apps), asyncio.get_running_loop(), None, log)
    published: list[Event] = []
    node.bus.publish = published.append  # type: ignore[method-assign]
    a, b, c, d = (ev(i=i) for i in range(4))
    assert node.accept([a]) and node.accept([b])
    assert not node.accept([c, d])  # two do not fit in the one place left: neither goes
    assert node.accept([c])
    assert not node.accept([d])  # full: refused by record() itself
    assert published == [a, b, c] and node.stats.audit_refused == 2
    assert log.queue_depth == 3 and log.stats.refused == 1


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_record_refuses_what_the_journal_cannot_take(make_log: MakeLog,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """record() (compiled) journals each row before queueing it: when the live segment is
    full and no new one can be made (a full disk), the event is refused and counted, and
    every event accepted before and after reaches the database once."""
    import errno

    log = make_log(journal_rotate_bytes=4096)
    await log.start()
    events = [ev(i=i) for i in range(200)]
    assert all(log.record(e) for e in events[:10])

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", full)
    results = [log.record(e) for e in events[10:]]
    assert False in results and all(results[:results.index(False)])
    refused = results.count(False)
    assert log.stats.refused == refused and log.stats.journal_errors == refused
    assert log.stats.recorded == 10 + results.count(True)
    monkeypatch.undo()
    later = ev(i=999)
    assert log.record(later)
    await log.flush()
    accepted = events[:10] + [e for e, ok in zip(events[10:], results, strict=True) if ok]
    assert await count_all(log) == [e.id for e in accepted + [later]]


def test_journal_frame_crc_is_zlibs() -> None:
    """The journal's frames are checked on replay with zlib.crc32 (spill.read_frame): the
    compiled CRC (carry-less folding over whole 16-byte blocks, zlib for the rest) must give
    the same value for every length and alignment."""
    import zlib

    from fastrelay.audit._journal import crc32

    blob = os.urandom(5000)
    for n in [*range(0, 260), 1000, 4097]:
        for start in (0, 1, 7):
            data = blob[start:start + n]
            assert crc32(data) == zlib.crc32(data), (n, start)


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_queued_rows_are_out_of_the_cycle_collectors_sight(make_log: MakeLog) -> None:
    """A queued row of strings and numbers cannot be part of a cycle: record() untracks it,
    so young collections do not traverse the queue and promote it to the old generation."""
    import gc

    log = make_log(flush_interval=60, batch_rows=1000)  # the writer waits
    await log.start()
    server = ev(i=1)
    client = Event("app", ["private-a"], "client-x", {"k": [1, 2]}, source="client")
    assert log.record(server) and log.record(client)
    rows = list(log._queue)
    assert [r[0] for r in rows] == [server.id, client.id]
    assert not any(gc.is_tracked(r) or gc.is_tracked(r[2]) for r in rows)
    assert orjson.loads(rows[1][4]) == {"k": [1, 2]}
    await log.flush()
    assert await count_all(log) == [r[0] for r in rows]


def test_journal_rows_come_back_as_written(tmp_path: Path) -> None:
    """The Recorder's rows are framed in the journal's binary layout, and a row that layout
    cannot hold (a lone surrogate, a column of another type) as JSON; the replay's reader
    gives every row back as it was queued, in order, in either layout."""
    from fastrelay.audit._journal import frame_rows
    from fastrelay.audit.journal import Journal
    from fastrelay.audit.spill import read_frame

    rows = [
        ("01", "app", ("a", "b"), "ev", '{"x":1}', None, "api", 1.5, None, None),
        ("02", "app", ("é☃",), "ñ", "données 🎉", "1.2", "client", 1796269369.123456, "u", "01"),
        ("03", "app", ("c",), "n", "bad \ud800 data", None, "api", 2.0, None, None),
        ("04", "app", ("c",), "n", "x", None, "api", 3, None, None),  # an int accepted_at
        ("05", "app", (), "", "", None, "api", 0.0, None, None),
    ]
    j = Journal(tmp_path)
    j.open()
    assert all(j.append_row(r) for r in rows)
    assert j.path is not None
    fd = os.open(j.path, os.O_RDONLY)
    back = Journal.read_rows(fd, j.path)
    assert [tuple(tuple(c) if type(c) is list else c for c in r) for r in back] == rows
    first = read_frame(fd, 0, os.fstat(fd).st_size)
    assert first is not None and first[1][:1] == b"\x01"  # binary, not JSON
    with pytest.raises(ValueError):
        frame_rows(first[1][:-1])  # a row frame cut short is an error, never a shorter row
    os.close(fd)
    j.close(remove=True)
