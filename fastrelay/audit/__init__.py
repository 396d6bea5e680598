"""The audit log: every accepted event, recorded off the hot path for auditing and replay.

    log = open_audit(settings.database_url, settings.data_dir)
    await log.start()
    if not log.record(event):      # O(1), journaled (one write), never blocks; False -> 503
        ...
    await log.query(app_id, channel="orders", limit=50)   # newest first
    await log.close()              # flushes

PostgreSQL (asyncpg) when database_url is postgres:// or postgresql://, else SQLite at
data_dir/audit.sqlite3. Both share the queue, batching, spill file and metrics in `AuditLog`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import AuditLog, AuditStats

__all__ = ["AuditLog", "AuditStats", "open_audit"]


def open_audit(database_url: str | None, data_dir: Path, *, spill_dir: Path | None = None,
               **options: Any) -> AuditLog:
    """Builds the audit log for a URL (not started: `await log.start()`).

    `options` go to the backend: for both those of `AuditLog` (queue_size, batch_rows,
    flush_interval, retention_days, retry_interval, max_retry_interval, maintenance_interval,
    journal, ...); for PostgreSQL also schema, table, application_name, pool_size,
    connect_timeout, write_timeout, partitions_ahead.
    """
    # the write-ahead journal is shared by all worker processes of the data dir (each owns its
    # own segments; journals of dead ones are replayed by the next to start); turning it off
    # (setting audit_journal = false) loses the queue's content on a crash: diagnostics only
    options.setdefault("journal_dir", Path(data_dir) / "journal")
    data_dir = Path(data_dir)
    # each worker process keeps its own spill file; the SQLite database is shared
    spill = Path(spill_dir) if spill_dir is not None else data_dir
    if database_url and database_url.startswith(("postgres://", "postgresql://")):
        from .postgres import PostgresAuditLog

        return PostgresAuditLog(database_url, spill, **options)
    from .sqlite import SqliteAuditLog

    return SqliteAuditLog(data_dir / "audit.sqlite3", spill, **options)
