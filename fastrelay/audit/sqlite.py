"""SQLite audit backend for single-node deployments (stdlib sqlite3).

Events are stored in batches (audit/_sqlite.pyx): a row of audit_batches holds up to 1,000
rows of one app whose ids share their first 8 characters, as one JSON array, with the bounds
queries select by (ids, accepted_at); audit_batch_channels and audit_batch_names index each
batch under every channel and event name its rows hold, newest first. The batches are
committed by a child process (`sqlite_writer.py`), so no thread of the worker runs the writes
beside its event loop.
Schema setup and retention use a connection on a thread (rare, off the hot path); queries use
another, which WAL mode lets run alongside writes.

A query walks the batches its bounds select, newest last id first, decodes them and keeps
the rows that match, until no batch left can hold a row newer than those it has. An event
written twice (a journal replayed after its batch committed) is stored twice and returned
once. The view audit_events shows one row per stored event, for ad-hoc SQL.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from .._core import event_id_floor
from ._sqlite import BATCH_ROWS, PREFIX, pack
from .base import COLUMNS, MAX_QUERY_LIMIT, AuditLog, Row
from .sqlite_writer import FRAME, POISON, connect

_SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_schema_version (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_batches (
    seq INTEGER PRIMARY KEY,  -- commit order: retention walks it
    app_id TEXT NOT NULL,
    first_id TEXT NOT NULL,
    last_id TEXT NOT NULL,
    first_at REAL NOT NULL,  -- the rows' least and greatest accepted_at
    last_at REAL NOT NULL,
    count INTEGER NOT NULL,
    channels TEXT NOT NULL,  -- JSON arrays: the channels and event names of its rows
    names TEXT NOT NULL,
    rows BLOB NOT NULL  -- JSON array of rows, base.COLUMNS
);
CREATE INDEX IF NOT EXISTS audit_batches_app ON audit_batches (app_id, last_id, first_id);
CREATE TABLE IF NOT EXISTS audit_batch_channels (
    app_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    last_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (app_id, channel, last_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_batch_names (
    app_id TEXT NOT NULL,
    name TEXT NOT NULL,
    last_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (app_id, name, last_id, seq)
) WITHOUT ROWID;
"""
# Versions 1 and 2 stored a row per event (audit_events, audit_event_channels). Their rows
# move into batches in one transaction, grouped as the writer groups them (accepted_at is
# printed with 17 digits: JSON's default 15 would round it).
_MIGRATE_ROWS = f"""
INSERT INTO audit_batches (app_id, first_id, last_id, first_at, last_at, count, channels, names,
                           rows)
SELECT app_id, min(id), max(id), min(accepted_at), max(accepted_at), count(*), '[]',
       json_group_array(DISTINCT name),
       json_group_array(json_array(id, app_id, json(channels), name, data, socket_id, source,
                                   json(printf('%!.17g', accepted_at)), user_id, replay_of))
FROM (SELECT *, (row_number() OVER (PARTITION BY app_id, substr(id, 1, {PREFIX}) ORDER BY id)
                 - 1) / {BATCH_ROWS} AS chunk
      FROM audit_events)
GROUP BY app_id, substr(id, 1, {PREFIX}), chunk;
UPDATE audit_batches SET channels = (
    SELECT json_group_array(DISTINCT c.value)
    FROM json_each(audit_batches.rows) r, json_each(r.value, '$[2]') c);
INSERT INTO audit_batch_channels
SELECT b.app_id, c.value, b.last_id, b.seq FROM audit_batches b, json_each(b.channels) c;
INSERT INTO audit_batch_names
SELECT b.app_id, n.value, b.last_id, b.seq FROM audit_batches b, json_each(b.names) n;
DROP TABLE audit_event_channels;
DROP TABLE audit_events;
"""
_VIEW = """
CREATE VIEW IF NOT EXISTS audit_events AS
SELECT json_extract(r.value, '$[0]') AS id, b.app_id AS app_id,
       json_extract(r.value, '$[2]') AS channels, json_extract(r.value, '$[3]') AS name,
       json_extract(r.value, '$[4]') AS data, json_extract(r.value, '$[5]') AS socket_id,
       json_extract(r.value, '$[6]') AS source, json_extract(r.value, '$[7]') AS accepted_at,
       json_extract(r.value, '$[8]') AS user_id, json_extract(r.value, '$[9]') AS replay_of
FROM audit_batches b, json_each(b.rows) r;
"""
_RETENTION_CHUNK = 500  # batches per transaction: keeps the write lock short


class SqliteAuditLog(AuditLog):
    backend = "sqlite"

    def __init__(self, path: Path, data_dir: Path, **kw: Any) -> None:
        super().__init__(data_dir, **kw)
        self.path = Path(path)
        self._wx: ThreadPoolExecutor | None = None
        self._rx: ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._open_lock = asyncio.Lock()
        self._writer = WriterProcess(self.path)

    def _is_poison(self, exc: BaseException) -> bool:
        return isinstance(exc, POISON)

    async def _on(self, ex: ThreadPoolExecutor | None, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(ex, fn, *args)

    async def _open(self) -> None:
        if self._wconn is not None:
            return
        async with self._open_lock:
            if self._wconn is None:
                await self._open_locked()

    async def _open_locked(self) -> None:
        if self._wx is None:
            self._wx = ThreadPoolExecutor(1, thread_name_prefix="audit-sqlite-w")
            self._rx = ThreadPoolExecutor(1, thread_name_prefix="audit-sqlite-r")

        def open_write() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")  # one worker migrates; the others wait, then see it
            try:
                if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'audit_events'").fetchone():
                    for statement in _MIGRATE_ROWS.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO audit_schema_version VALUES (?, ?)",
                             (_SCHEMA_VERSION, time.time()))
                conn.execute(_VIEW)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return conn

        wconn = await self._on(self._wx, open_write)
        self._rconn = await self._on(self._rx, connect, self.path)
        self._wconn = wconn  # last: it is the "opened" flag

    async def _close(self) -> None:
        await self._writer.close()
        if self._wconn is not None:
            await self._on(self._wx, self._wconn.close)
        if self._rconn is not None:
            await self._on(self._rx, self._rconn.close)
        self._wconn = self._rconn = None
        for ex in (self._wx, self._rx):
            if ex is not None:
                ex.shutdown(wait=True)
        self._wx = self._rx = None

    async def _write(self, rows: list[Row], again: bool = False) -> None:
        await self._open()  # the schema exists before the writer's first insert
        if again:
            conn = self._rconn
            assert conn is not None
            rows = await self._on(self._rx, _unstored, conn, rows)
        await self._writer.write(rows)

    async def query(self, app_id: str, channel: str | None = None, event: str | None = None,
                    since: float | None = None, until: float | None = None, limit: int = 100,
                    before: str | None = None) -> list[dict[str, Any]]:
        limit = max(1, min(limit, MAX_QUERY_LIMIT))
        # the batches that can hold a match, newest last id first, through the index that
        # narrows them (a channel's, or an event name's); the rows decide
        args: list[Any]
        if channel is not None or event is not None:
            table, column = (("audit_batch_channels", "channel") if channel is not None
                             else ("audit_batch_names", "name"))
            sql = (f"SELECT b.last_id, b.rows FROM {table} c JOIN audit_batches b "
                   f"ON b.seq = c.seq WHERE c.app_id = ? AND c.{column} = ?")
            args = [app_id, channel if channel is not None else event]
            last = "c.last_id"
        else:
            sql = "SELECT b.last_id, b.rows FROM audit_batches b WHERE b.app_id = ?"
            args = [app_id]
            last = "b.last_id"
        if since is not None:
            # ids sort by time: a batch holding a row accepted since then ends above the floor
            sql += f" AND {last} >= ? AND b.last_at >= ?"
            args += [event_id_floor(since), since]
        if until is not None:
            sql += " AND b.first_at < ?"
            args.append(until)
        if before is not None:
            sql += " AND b.first_id < ?"
            args.append(before)
        sql += f" ORDER BY {last} DESC"

        def keep(r: list[Any]) -> bool:
            return ((channel is None or channel in r[2]) and (event is None or r[3] == event)
                    and (since is None or r[7] >= since) and (until is None or r[7] < until)
                    and (before is None or r[0] < before))

        def run(conn: sqlite3.Connection) -> list[list[Any]]:
            found: dict[str, list[Any]] = {}  # by id: an event stored twice is returned once
            least = None  # the least id among the newest `limit` found
            for last_id, blob in conn.execute(sql, args):
                if least is not None and last_id < least:
                    break  # this batch and every later one hold only older ids
                for r in orjson.loads(blob):
                    if keep(r):
                        found[r[0]] = r
                if len(found) >= limit:
                    newest = heapq.nlargest(limit, found)
                    found = {i: found[i] for i in newest}
                    least = newest[-1]
            return [found[i] for i in heapq.nlargest(limit, found)]

        await self._open()
        conn = self._rconn
        assert conn is not None
        rows = await self._on(self._rx, run, conn)
        return [_as_dict(r) for r in rows]

    async def get(self, app_id: str, event_id: str) -> dict[str, Any] | None:
        def run(conn: sqlite3.Connection) -> list[Any] | None:
            return next((r for r in _rows_between(conn, app_id, event_id, event_id)
                         if r[0] == event_id), None)

        await self._open()
        conn = self._rconn
        assert conn is not None
        row = await self._on(self._rx, run, conn)
        return None if row is None else _as_dict(row)

    async def apply_retention(self, now: float | None = None) -> int:
        """Deletes batches whose every row is older than retention_days, in short
        transactions; returns how many rows they held."""
        if self.retention_days <= 0:
            return 0
        await self._open()
        conn = self._wconn
        assert conn is not None
        cutoff = (time.time() if now is None else now) - self.retention_days * 86_400

        def delete_chunk(after: int) -> tuple[int, int]:
            # Oldest first in commit order (time order, but for batches a journal replay
            # wrote late, which go once their neighbours are old), with no index on time: a
            # pass costs what it deletes, plus one chunk.
            batches = conn.execute(
                "SELECT seq, app_id, last_id, channels, names, last_at, count FROM audit_batches"
                " WHERE seq > ? ORDER BY seq LIMIT ?", (after, _RETENTION_CHUNK)).fetchall()
            old = [b for b in batches if b[5] < cutoff]
            if not old:
                return 0, after
            conn.execute("BEGIN IMMEDIATE")
            try:
                for table, column, i in (("audit_batch_channels", "channel", 3),
                                         ("audit_batch_names", "name", 4)):
                    conn.executemany(
                        f"DELETE FROM {table} "
                        f"WHERE app_id = ? AND {column} = ? AND last_id = ? AND seq = ?",
                        [(b[1], key, b[2], b[0]) for b in old for key in orjson.loads(b[i])])
                conn.executemany("DELETE FROM audit_batches WHERE seq = ?",
                                 [(b[0],) for b in old])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return sum(b[6] for b in old), batches[-1][0]

        total, after = 0, 0
        while True:
            n, after = await self._on(self._wx, delete_chunk, after)
            if not n:
                return total
            total += n


PACK_ROWS = 250  # rows pack() turns into a request at a time, on the event loop


class WriterProcess:
    """The worker's end of its SQLite writer process (sqlite_writer.py), started on first use
    and again after it dies; a failed exchange raises, and the audit spills and retries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def write(self, rows: list[Row]) -> None:
        # Packed in steps of PACK_ROWS, yielding to the loop between them: one pack of 1,000
        # rows held it ~1 ms, which the answers waiting behind it showed on their p99. Poison
        # (a ValueError) or TypeError, for invalid rows, is raised before anything is sent.
        if not rows:
            return
        parts = [b""]  # the request's length goes first
        for i in range(0, len(rows), PACK_ROWS):
            if i:
                await asyncio.sleep(0)
            parts.append(pack(rows[i:i + PACK_ROWS]))
        parts[0] = FRAME.pack(sum(map(len, parts)))
        message = b"".join(parts)  # one request (one transaction), copied once
        async with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                proc = self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "fastrelay.audit.sqlite_writer", str(self.path),
                    str(os.getpid()),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(message)
                n = FRAME.unpack(await proc.stdout.readexactly(FRAME.size))[0]
                answer = await proc.stdout.readexactly(n)
            except BaseException as exc:
                # a half-done exchange (the writer died, or we were cancelled) cannot go on
                self._kill()
                if isinstance(exc, Exception):
                    raise sqlite3.OperationalError(f"audit writer process: {exc!r}") from exc
                raise
        if answer[:1] == b"K":
            return
        kind = sqlite3.IntegrityError if answer[:1] == b"P" else sqlite3.OperationalError
        raise kind(answer[1:].decode(errors="replace"))

    def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        self._proc = None

    async def close(self) -> None:
        """Ends the writer's input; it finishes what it holds and exits."""
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or proc.returncode is not None:
                return
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _unstored(conn: sqlite3.Connection, rows: list[Row]) -> list[Row]:
    """The rows not stored yet. Only journal replays and spill write-backs can repeat rows,
    and only this process writes those, so nothing else stores them between this look and
    the write. Invalid rows are kept: the writer refuses them."""
    by_app: dict[str, list[str]] = {}
    for r in rows:
        key = _key(r)
        if key is not None:
            by_app.setdefault(key[0], []).append(key[1])
    stored = {(app, r[0]) for app, ids in by_app.items()
              for r in _rows_between(conn, app, min(ids), max(ids))}
    return [r for r in rows if _key(r) not in stored]


def _rows_between(conn: sqlite3.Connection, app_id: str, lo: str, hi: str) -> Iterator[list[Any]]:
    """The rows of every stored batch that can hold an id from lo to hi: a batch's ids share
    their prefix, so it ends at or above lo and within hi's prefix (DEL is above any id
    character), and starts at or below hi."""
    for (blob,) in conn.execute(
            "SELECT rows FROM audit_batches WHERE app_id = ? AND last_id >= ? "
            "AND last_id < ? AND first_id <= ?", (app_id, lo, hi[:PREFIX] + "\x7f", hi)):
        yield from orjson.loads(blob)


def _key(r: Any) -> tuple[str, str] | None:
    """(app_id, id) of a well-formed row."""
    if isinstance(r, (list, tuple)) and len(r) > 1 and isinstance(r[0], str) \
            and isinstance(r[1], str):
        return r[1], r[0]
    return None


def _as_dict(r: list[Any]) -> dict[str, Any]:
    return dict(zip(COLUMNS, r, strict=True))
