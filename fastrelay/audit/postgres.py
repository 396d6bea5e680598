"""PostgreSQL audit backend (asyncpg).

Rows are COPYed (binary protocol, the fastest bulk path) into a per-connection temp staging
table, then moved with INSERT ... SELECT ... ON CONFLICT DO NOTHING, so a batch written twice
(retried after a timeout, or written back from the spill file) lands exactly once.

The table is partitioned by day on accepted_at: retention is DROP TABLE of whole partitions
(no row-by-row DELETE, no vacuum debt), and time-bounded queries prune partitions.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from .base import COLUMNS, MAX_QUERY_LIMIT, AuditLog, Row

log = logging.getLogger("fastrelay.audit")

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,40}")  # fullmatch: "$" would let a final newline in
_DAY = 86_400


def _day_name(day: int) -> str:
    return datetime.fromtimestamp(day * _DAY, UTC).strftime("%Y%m%d")


def _clean(s: str) -> str:
    # PostgreSQL text cannot hold NUL; everything else in a Python str is storable.
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


class PostgresAuditLog(AuditLog):
    backend = "postgresql"

    def __init__(self, dsn: str, data_dir: Path, *, schema: str = "public",
                 table: str = "audit_events", application_name: str = "fastrelay-audit",
                 pool_size: int = 4, connect_timeout: float = 5.0, write_timeout: float = 10.0,
                 partitions_ahead: int = 2, **kw: Any) -> None:
        super().__init__(data_dir, **kw)
        if not _IDENT.fullmatch(schema) or not _IDENT.fullmatch(table):
            raise ValueError("schema and table must be lowercase SQL identifiers")
        self.dsn = dsn
        self.schema = schema
        self.table = table
        self.application_name = application_name
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.partitions_ahead = partitions_ahead
        self._fq = f"{schema}.{table}"
        self._stage = f"{table}_stage"
        self._pool: asyncpg.Pool | None = None
        self._parts: set[int] = set()  # days (unix days, UTC) known to have a partition
        self._lock_key = f"fastrelay-audit:{schema}.{table}"
        self._open_lock = asyncio.Lock()  # writer, queries and maintenance may open at once

    # ---- connection and schema ---------------------------------------------------------

    def _is_poison(self, exc: BaseException) -> bool:
        # Only errors about the data itself; anything else (network, server restart, even a
        # dropped table) is treated as transient: spill and retry, never drop rows.
        return isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError
                          | ValueError | TypeError | asyncpg.InvalidPasswordError
                          | asyncpg.InvalidCatalogNameError)

    async def _init_conn(self, conn: asyncpg.Connection) -> None:
        # Temp tables live per session, so every pooled connection gets its own stage.
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {self._stage} ("
            "id text, app_id text, channels text[], name text, data text, socket_id text, "
            "source text, accepted_at timestamptz, user_id text, replay_of text"
            ") ON COMMIT DELETE ROWS"
        )

    async def _open(self) -> None:
        if self._pool is not None:
            return
        async with self._open_lock:
            if self._pool is None:
                await self._open_locked()

    async def _open_locked(self) -> None:
        pool = await asyncio.wait_for(asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.pool_size, timeout=self.connect_timeout,
            command_timeout=self.write_timeout, init=self._init_conn,
            server_settings={"application_name": self.application_name},
        ), self.connect_timeout * 2)
        try:
            await self._migrate(pool)
            self._parts.clear()
            await self._ensure_partitions(pool, self._ahead_days(time.time()))
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        s, t = self.schema, self.table
        migrations = [
            # 1: the partitioned events table and its indexes
            [
                f"""CREATE TABLE {s}.{t} (
                    id text NOT NULL,
                    app_id text NOT NULL,
                    channels text[] NOT NULL,
                    name text NOT NULL,
                    data text NOT NULL,
                    socket_id text,
                    source text NOT NULL,
                    accepted_at timestamptz NOT NULL,
                    user_id text,
                    replay_of text,
                    -- the partition key must be part of any unique key; ids are unique anyway
                    PRIMARY KEY (id, accepted_at)
                ) PARTITION BY RANGE (accepted_at)""",
                # pagination: WHERE app_id = $1 AND id < $cursor ORDER BY id DESC
                f"CREATE INDEX {t}_app_id_idx ON {s}.{t} (app_id, id)",
                # channel filter: channels @> ARRAY[$c]
                f"CREATE INDEX {t}_channels_idx ON {s}.{t} USING gin (channels)",
            ],
        ]
        async with pool.acquire() as conn, conn.transaction():
            # Serialises nodes migrating the same table at once.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._lock_key)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.{t}_schema_version ("
                "version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval(
                f"SELECT coalesce(max(version), 0) FROM {s}.{t}_schema_version")
            for version, statements in enumerate(migrations, start=1):
                if version <= current:
                    continue
                for sql in statements:
                    await conn.execute(sql)
                await conn.execute(
                    f"INSERT INTO {s}.{t}_schema_version (version) VALUES ($1)", version)
                log.info("audit: migrated %s.%s to schema version %d", s, t, version)

    def _ahead_days(self, now: float) -> range:
        today = int(now // _DAY)
        return range(today - 1, today + self.partitions_ahead + 1)

    async def _ensure_partitions(self, pool: asyncpg.Pool, days: Iterable[int]) -> None:
        missing = sorted({d for d in days if d not in self._parts})
        if not missing:
            return
        s, t = self.schema, self.table
        async with pool.acquire() as c, c.transaction():
            await c.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._lock_key)
            for day in missing:
                lo = datetime.fromtimestamp(day * _DAY, UTC)
                hi = datetime.fromtimestamp((day + 1) * _DAY, UTC)
                await c.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.{t}_p{_day_name(day)} PARTITION OF {s}.{t} "
                    f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
                )
        self._parts.update(missing)

    async def _maintain_once(self) -> None:
        if self._pool is not None:
            await self._ensure_partitions(self._pool, self._ahead_days(time.time()))
        await self.apply_retention()

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), 5)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    # ---- writes ------------------------------------------------------------------------

    async def _write(self, rows: list[Row], again: bool = False) -> None:
        # `again` needs nothing more: ON CONFLICT (id) DO NOTHING skips rows already stored
        await self._open()
        pool = self._pool
        assert pool is not None
        lo = hi = rows[0][7]
        records = []
        for r in rows:
            ts = r[7]
            if ts < lo:
                lo = ts
            elif ts > hi:
                hi = ts
            records.append((r[0], r[1], r[2], _clean(r[3]), _clean(r[4]), r[5], r[6],
                            datetime.fromtimestamp(ts, UTC), r[8], r[9]))
        lo_day, hi_day = int(lo // _DAY), int(hi // _DAY)
        # Usually one day; a batch mixing far apart days (spill written back after a long
        # outage) gets only the days it has, not every day in between.
        await self._ensure_partitions(pool, range(lo_day, hi_day + 1) if hi_day - lo_day < 2
                                      else {int(r[7] // _DAY) for r in rows})
        conn = await pool.acquire(timeout=self.connect_timeout)
        try:
            async with asyncio.timeout(self.write_timeout), conn.transaction():
                await conn.copy_records_to_table(self._stage, records=records, columns=COLUMNS)
                await conn.execute(
                    f"INSERT INTO {self._fq} SELECT * FROM {self._stage} "
                    "ON CONFLICT DO NOTHING"
                )
        except BaseException:
            # A connection interrupted mid-COPY is in an unknown state: never reuse it.
            conn.terminate()
            raise
        finally:
            await pool.release(conn)

    # ---- reads -------------------------------------------------------------------------

    async def _reader(self) -> asyncpg.Pool:
        await self._open()
        assert self._pool is not None
        return self._pool

    async def query(self, app_id: str, channel: str | None = None, event: str | None = None,
                    since: float | None = None, until: float | None = None, limit: int = 100,
                    before: str | None = None) -> list[dict[str, Any]]:
        where, args = ["app_id = $1"], [app_id]
        if channel is not None:
            args.append([channel])
            where.append(f"channels @> ${len(args)}::text[]")
        if event is not None:
            args.append(event)
            where.append(f"name = ${len(args)}")
        if since is not None:
            args.append(datetime.fromtimestamp(since, UTC))
            where.append(f"accepted_at >= ${len(args)}")
        if until is not None:
            args.append(datetime.fromtimestamp(until, UTC))
            where.append(f"accepted_at < ${len(args)}")
        if before is not None:
            args.append(before)
            where.append(f"id < ${len(args)}")
        args.append(max(1, min(limit, MAX_QUERY_LIMIT)))
        sql = (f"SELECT {', '.join(COLUMNS)} FROM {self._fq} WHERE {' AND '.join(where)} "
               f"ORDER BY id DESC LIMIT ${len(args)}")
        pool = await self._reader()
        return [_as_dict(r) for r in await pool.fetch(sql, *args)]

    async def get(self, app_id: str, event_id: str) -> dict[str, Any] | None:
        pool = await self._reader()
        r = await pool.fetchrow(
            f"SELECT {', '.join(COLUMNS)} FROM {self._fq} WHERE app_id = $1 AND id = $2",
            app_id, event_id)
        return None if r is None else _as_dict(r)

    async def apply_retention(self, now: float | None = None) -> int:
        """Drops partitions whose whole day is older than retention_days; returns how many."""
        if self.retention_days <= 0:
            return 0
        pool = await self._reader()
        cutoff_day = int(((time.time() if now is None else now)
                          - self.retention_days * _DAY) // _DAY)
        dropped = 0
        prefix = f"{self.table}_p"
        for name in await self.partitions():
            suffix = name[len(prefix):] if name.startswith(prefix) else ""
            try:
                day = int(datetime.strptime(suffix, "%Y%m%d").replace(tzinfo=UTC)
                          .timestamp()) // _DAY
            except ValueError:
                continue  # not one of ours
            if day < cutoff_day:  # the partition ends at or before the cutoff day starts
                await pool.execute(f"DROP TABLE IF EXISTS {self.schema}.{name}")
                self._parts.discard(day)
                dropped += 1
                log.info("audit: dropped partition %s.%s (retention)", self.schema, name)
        return dropped

    async def partitions(self) -> list[str]:
        """Partition table names, oldest first (for tests and operators)."""
        pool = await self._reader()
        rows = await pool.fetch(
            "SELECT c.relname FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
            "JOIN pg_namespace n ON n.oid = p.relnamespace "
            "WHERE n.nspname = $1 AND p.relname = $2 ORDER BY 1", self.schema, self.table)
        return [r[0] for r in rows]


def _as_dict(r: asyncpg.Record) -> dict[str, Any]:
    d = dict(r)
    d["channels"] = list(d["channels"])
    d["accepted_at"] = d["accepted_at"].timestamp()
    return d
