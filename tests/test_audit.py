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
from fastrelay.audit._sqlite import Poison, Transient, Writer
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
    e = Event(app, channels or ["c"], name, f'{{"i":{i}}}', socket_id="1.2", source="api")
    if accepted_at is not None:
        e.accepted_at = accepted_at
    return e


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


async def test_same_event_twice_stored_once(make_log: MakeLog) -> None:
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


def test_sqlite_writer_commits_whole_batches_and_sorts_errors(tmp_path: Path) -> None:
    """The writer child's C insert loop: a batch commits whole or not at all; invalid rows
    raise Poison (the caller isolates them), a database problem raises Transient (it spills)."""
    path = tmp_path / "audit.db"
    missing = Writer(str(path))  # no schema yet: not the rows' fault
    with pytest.raises(Transient):
        missing.write(orjson.dumps([["i0", "app", ["c"], "n", "d", None, "api", 1.5, None, None]]))
    missing.close()
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA)
    w = Writer(str(path))

    def row(i: int, **change: Any) -> list[Any]:
        r = {"id": f"id{i}", "app_id": "app", "channels": ["a", "b"], "name": "n",
             "data": "é", "socket_id": None, "source": "api", "accepted_at": 1.5 + i,
             "user_id": None, "replay_of": None}
        r.update(change)
        return list(r.values())

    w.write(orjson.dumps([row(1), row(2, socket_id="1.2", user_id="u")]))
    w.write(orjson.dumps([row(1)]))  # the same id again: skipped, not an error
    for bad in ([row(3), row(4, name=None)],          # NOT NULL
                [row(3), row(4, data={"x": 1})],      # not text
                [row(3), row(4, accepted_at="now")],  # not a number
                [row(3), row(4)[:9]],                 # a column short
                [row(3), row(4, channels="a")]):      # channels is a list
        with pytest.raises(Poison):
            w.write(orjson.dumps(bad))
    with pytest.raises(ValueError):
        w.write(b"[not json")
    w.write(orjson.dumps([row(5)]))  # each refusal rolled back: the writer goes on
    w.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, channels, data, socket_id, accepted_at, user_id "
                          "FROM audit_events ORDER BY id").fetchall()
        chans = db.execute("SELECT * FROM audit_event_channels ORDER BY 2, 3").fetchall()
    # id3 of each refused batch was rolled back with it
    assert rows == [("id1", '["a","b"]', "é", None, 2.5, None),
                    ("id2", '["a","b"]', "é", "1.2", 3.5, "u"),
                    ("id5", '["a","b"]', "é", None, 6.5, None)]
    assert chans == [("app", ch, f"id{i}") for ch in "ab" for i in (1, 2, 5)]


@pytest.mark.parametrize("make_log", ["sqlite"], indirect=True)
async def test_sqlite_version_1_file_migrates_and_retention_walks_rowids(
        make_log: MakeLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file made by schema version 1 loses its accepted_at index on open. Retention deletes
    old rows in insertion order without it; an old row written late (a journal replay) goes
    once the rows around it are old too, and a newer row in between does not stop the pass."""
    with sqlite3.connect(tmp_path / "audit.sqlite3") as db:
        db.executescript(_SCHEMA.replace(
            "DROP INDEX IF EXISTS audit_events_accepted_at;",
            "CREATE INDEX IF NOT EXISTS audit_events_accepted_at ON audit_events (accepted_at);"))
    log = make_log(retention_days=7)
    await log.start()
    now = time.time()
    old = [ev(i=i, accepted_at=now - 10 * DAY + i) for i in range(3)]
    skewed = ev(i=99, accepted_at=now - DAY)  # written between old rows: kept, passed over
    more_old = [ev(i=i, accepted_at=now - 9 * DAY + i) for i in range(3)]
    new = [ev(i=i, accepted_at=now - 1 * DAY + i) for i in range(3)]
    late = ev(i=7, accepted_at=now - 20 * DAY)  # a replayed journal's row, written after `new`
    for e in old + [skewed] + more_old + new + [late]:
        assert log.record(e)
    await log.flush()
    with sqlite3.connect(tmp_path / "audit.sqlite3") as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "audit_events_accepted_at" not in names and "audit_events_app_id" in names
        assert db.execute("SELECT max(version) FROM audit_schema_version").fetchone()[0] == 2
    monkeypatch.setattr(audit_sqlite, "_RETENTION_CHUNK", 2)  # the pass ends in a chunk of new rows
    assert await log.apply_retention(now=now) == 6
    assert await count_all(log) == [skewed.id] + [e.id for e in new] + [late.id]
    assert await log.apply_retention(now=now + 7 * DAY) == 5  # all old now, the late row too
    assert await count_all(log) == []


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
