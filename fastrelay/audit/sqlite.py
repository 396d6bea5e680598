"""SQLite audit backend for single-node deployments (stdlib sqlite3).

Batches are committed by a child process (`sqlite_writer.py`: one executemany transaction
with INSERT OR IGNORE by id), so no thread of the worker runs the batch writes beside its
event loop. Schema setup and retention use a connection on a thread (rare, off the hot path);
queries use another, which WAL mode lets run alongside writes.

Channel filter: a side table audit_event_channels(app_id, channel, event_id) whose primary
key is exactly the lookup (app, channel, newest ids first), so a channel query is an index
range scan. LIKE over a JSON text column would scan every row of the app and needs escaping
to avoid false matches ("a" inside "ab").
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from .._core import event_id_floor
from .base import COLUMNS, MAX_QUERY_LIMIT, AuditLog, Row
from .sqlite_writer import FRAME, POISON, connect

_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_schema_version (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_events (
    id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    channels TEXT NOT NULL,  -- JSON array, for display; filtering uses audit_event_channels
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    socket_id TEXT,
    source TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    user_id TEXT,
    replay_of TEXT
);
CREATE INDEX IF NOT EXISTS audit_events_app_id ON audit_events (app_id, id);
-- version 1 indexed accepted_at for retention alone; retention walks rowids instead, and the
-- index cost the writer ~0.6 us of its ~5 us per row
DROP INDEX IF EXISTS audit_events_accepted_at;
CREATE TABLE IF NOT EXISTS audit_event_channels (
    app_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (app_id, channel, event_id)
) WITHOUT ROWID;
"""
_SELECT = "SELECT " + ", ".join("e." + c for c in COLUMNS)
_RETENTION_CHUNK = 5000  # rows per transaction: keeps the write lock short


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
            conn.execute("INSERT OR IGNORE INTO audit_schema_version VALUES (?, ?)",
                         (_SCHEMA_VERSION, time.time()))
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

    async def _write(self, rows: list[Row]) -> None:
        await self._open()  # the schema exists before the writer's first insert
        await self._writer.write(rows)

    async def query(self, app_id: str, channel: str | None = None, event: str | None = None,
                    since: float | None = None, until: float | None = None, limit: int = 100,
                    before: str | None = None) -> list[dict[str, Any]]:
        args: list[Any]
        if channel is not None:
            sql = (f"{_SELECT} FROM audit_event_channels c JOIN audit_events e "
                   "ON e.id = c.event_id WHERE c.app_id = ? AND c.channel = ?")
            args = [app_id, channel]
            id_col = "c.event_id"
        else:
            sql = f"{_SELECT} FROM audit_events e WHERE e.app_id = ?"
            args = [app_id]
            id_col = "e.id"
        if event is not None:
            sql += " AND e.name = ?"
            args.append(event)
        if since is not None:
            # the id bound keeps the walk short (ids sort by time); accepted_at decides
            sql += f" AND {id_col} >= ? AND e.accepted_at >= ?"
            args += [event_id_floor(since), since]
        if until is not None:
            sql += " AND e.accepted_at < ?"
            args.append(until)
        if before is not None:
            sql += f" AND {id_col} < ?"
            args.append(before)
        sql += f" ORDER BY {id_col} DESC LIMIT ?"
        args.append(max(1, min(limit, MAX_QUERY_LIMIT)))
        await self._open()
        conn = self._rconn
        assert conn is not None
        rows = await self._on(self._rx, lambda: conn.execute(sql, args).fetchall())
        return [_as_dict(r) for r in rows]

    async def get(self, app_id: str, event_id: str) -> dict[str, Any] | None:
        await self._open()
        conn = self._rconn
        assert conn is not None
        row = await self._on(self._rx, lambda: conn.execute(
            f"{_SELECT} FROM audit_events e WHERE e.id = ? AND e.app_id = ?",
            (event_id, app_id)).fetchone())
        return None if row is None else _as_dict(row)

    async def apply_retention(self, now: float | None = None) -> int:
        """Deletes rows older than retention_days in short transactions; returns how many."""
        if self.retention_days <= 0:
            return 0
        await self._open()
        conn = self._wconn
        assert conn is not None
        cutoff = (time.time() if now is None else now) - self.retention_days * 86_400

        def delete_chunk(after: int) -> tuple[int, int]:
            # Oldest first in insertion order (rowid order is time order, but for rows a
            # journal replay wrote late, which go once their neighbours are old), no index
            # on accepted_at: a pass costs what it deletes, plus one chunk.
            rows = conn.execute("SELECT rowid, id, app_id, channels, accepted_at "
                                "FROM audit_events WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                (after, _RETENTION_CHUNK)).fetchall()
            old = [r for r in rows if r[4] < cutoff]
            if not old:
                return 0, after
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "DELETE FROM audit_event_channels "
                    "WHERE app_id = ? AND channel = ? AND event_id = ?",
                    [(app, ch, eid) for _, eid, app, chs, _ in old for ch in orjson.loads(chs)])
                conn.executemany("DELETE FROM audit_events WHERE rowid = ?",
                                 [(r[0],) for r in old])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return len(old), rows[-1][0]

        total, after = 0, 0
        while True:
            n, after = await self._on(self._wx, delete_chunk, after)
            if not n:
                return total
            total += n


class WriterProcess:
    """The worker's end of its SQLite writer process (sqlite_writer.py), started on first use
    and again after it dies; a failed exchange raises, and the audit spills and retries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def write(self, rows: list[Row]) -> None:
        payload = orjson.dumps(rows)  # TypeError here is poison, as in the writer
        async with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                proc = self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "fastrelay.audit.sqlite_writer", str(self.path),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(FRAME.pack(len(payload)) + payload)
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


def _as_dict(r: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(COLUMNS, r, strict=True))
    d["channels"] = orjson.loads(d["channels"])
    return d
