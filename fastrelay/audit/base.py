"""The backend-independent half of the audit log: the bounded queue, the batching writer task,
the spill-to-disk fallback and its write-back, and the counters exported as metrics.

Row layout shared by backends and the spill file (a tuple, or a list after a JSON round trip):
(id, app_id, channels, name, data, socket_id, source, accepted_at, user_id, replay_of)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._journal import Recorder
from .journal import Closed, Journal
from .spill import SpillFile, dumps

log = logging.getLogger("fastrelay.audit")

Row = Sequence[Any]
COLUMNS = ("id", "app_id", "channels", "name", "data", "socket_id", "source", "accepted_at",
           "user_id", "replay_of")
MAX_QUERY_LIMIT = 1000


@dataclass(slots=True)
class AuditStats:
    """Counters for metrics; all monotonic except the `last_*` gauges."""

    recorded: int = 0  # events accepted into the queue
    refused: int = 0  # record() calls refused because the queue was full
    rows_written: int = 0  # rows committed to the database (directly or from the spill)
    batches: int = 0  # database write transactions
    last_write_latency: float = 0.0  # seconds, last database batch
    last_batch_rows: int = 0
    write_seconds: float = 0.0  # total time in database writes
    write_errors: int = 0
    spilled_rows: int = 0  # rows appended to the spill file
    replayed_rows: int = 0  # rows written back from the spill file
    rejected_rows: int = 0  # rows the database refused as invalid, kept in audit.rejected
    journal_errors: int = 0  # record() calls refused because the journal write failed
    journal_replayed_rows: int = 0  # rows replayed from journals of dead processes at start

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class _Bad:
    """Something record() could not turn into a row: the writer rejects it (kept, not lost)."""

    __slots__ = ("item", "error")

    def __init__(self, item: Any, error: BaseException) -> None:
        self.item, self.error = item, error


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AuditLog(ABC):
    """An append-only record of accepted events, written off the hot path in batches.

    `record()` appends the row to this process's write-ahead journal (one write(2) to the
    page cache, no fsync: survives a crash of the process, not of the machine; see
    journal.py) and to an in-memory deque; a single writer task drains the deque every
    `flush_interval` seconds or `batch_rows` rows. Journal segments are dropped once their
    rows are durable; journals left by dead processes are replayed (at start and every
    `orphan_scan_interval`). If the database fails, batches go to an fsync'd spill file
    under `data_dir` and are written back, in order, once it is healthy; while anything
    is spilled new batches are spilled too, so the write-back stays ordered.
    """

    backend = "abstract"

    def __init__(self, data_dir: Path, *, queue_size: int = 100_000, batch_rows: int = 1000,
                 flush_interval: float = 0.005, retention_days: float = 7,
                 retry_interval: float = 0.25, max_retry_interval: float = 5.0,
                 maintenance_interval: float = 3600.0, journal_dir: Path | None = None,
                 journal: bool = True, journal_rotate_bytes: int = 4 << 20) -> None:
        if queue_size < 1 or batch_rows < 1:
            raise ValueError("queue_size and batch_rows must be >= 1")
        self.data_dir = Path(data_dir)
        self.queue_size = queue_size
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.retention_days = retention_days
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.maintenance_interval = maintenance_interval
        self._stats = AuditStats()
        self._queue: deque[tuple[Any, ...] | _Bad] = deque()  # rows, as journaled
        self._spill = SpillFile(self.data_dir / "audit.spill")
        self._rejected_path = self.data_dir / "audit.rejected.jsonl"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io: ThreadPoolExecutor | None = None  # spill file I/O, one thread keeps order
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._durable = 0  # rows recorded that are now in the database or the spill file
        self._pending: list[Any] | None = None  # a batch neither database nor spill took
        self._db_ok = False
        self._backoff = retry_interval
        self._next_retry = 0.0
        self._task: asyncio.Task[None] | None = None
        self._maint_task: asyncio.Task[None] | None = None
        self._journal = (Journal(Path(journal_dir) if journal_dir is not None
                                 else self.data_dir / "journal",
                                 rotate_bytes=journal_rotate_bytes) if journal else None)
        self._jdurable = 0  # journaled rows now durable, in journal order
        self._orphans: list[tuple[int, Path]] = []  # claimed journals of dead processes
        self._journal_warned = 0.0
        # journals left by processes that died after our start (an old generation after a
        # reload that could not flush, a slot that is not restarted) are looked for this often
        self.orphan_scan_interval = 30.0
        self._next_scan = 0.0
        # record(event, replay_of=None) -> bool: journals and queues the event; False when it
        # cannot (refuse the event: 503). True means the row is in the journal (page cache:
        # survives kill -9 of this process, not a power loss; no fsync here by design) and
        # queued for the database. O(1), no system call, no waiting; call from the event loop
        # thread; `replay_of` is the original id when re-sending. Compiled with its state
        # (audit/_journal.pyx) and bound here, so the hot path runs no Python frame for it.
        self._rec = Recorder(self._queue, queue_size, self._journal, self._bad,
                             self._journal_failed)
        self.record: Callable[..., bool] = self._rec.record

    # ---- backend hooks -------------------------------------------------------------------

    @abstractmethod
    async def _open(self) -> None:
        """Connects and migrates the schema; may raise an 'unavailable' error."""

    @abstractmethod
    async def _write(self, rows: list[Row], again: bool = False) -> None:
        """Writes rows in one transaction. `again`: some may be stored already (a journal
        replayed, a spill written back after an ambiguous failure); those are skipped."""

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    def _is_poison(self, exc: BaseException) -> bool:
        """True when exc says the rows are invalid (retrying will never help)."""

    @abstractmethod
    async def query(self, app_id: str, channel: str | None = None, event: str | None = None,
                    since: float | None = None, until: float | None = None, limit: int = 100,
                    before: str | None = None) -> list[dict[str, Any]]:
        """Newest first. since <= accepted_at < until; `before` is the last id of a page."""

    @abstractmethod
    async def get(self, app_id: str, event_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def apply_retention(self, now: float | None = None) -> int:
        """Removes events older than retention_days; returns partitions or rows dropped."""

    async def _maintain_once(self) -> None:
        await self.apply_retention()

    # ---- public API ----------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spill_pending_rows(self) -> int:
        return self._spill.pending_rows

    @property
    def healthy(self) -> bool:
        """The database took the last write and nothing waits in the spill file."""
        return self._db_ok and not self._spill.pending

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="audit-spill")
        leftover = await self._in_io(self._spill.open)
        if leftover:
            log.warning("audit: replaying %d rows left in %s", leftover, self._spill.path)
        if self._journal is not None:
            # claim first: our own segment must not look like an orphan to ourselves
            self._orphans = await self._in_io(self._journal.claim_orphans)
            await self._in_io(self._journal.open)
        try:
            await self._open()
            self._db_ok = True
        except Exception as exc:
            if self._is_poison(exc):
                raise
            # Start anyway: events spill to disk until the database is back.
            log.error("audit: %s unavailable at start (%r); spilling to %s",
                      self.backend, exc, self._spill.path)
            self._failed()
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        if self.maintenance_interval > 0:
            self._maint_task = asyncio.create_task(self._maintain(), name="audit-maintenance")

    def has_room(self, n: int) -> bool:
        """Whether n more events fit now: a batch is checked whole, so it is accepted whole."""
        return len(self._queue) + n <= self.queue_size and not self._closing

    def _bad(self, event: Any, replay_of: str | None, exc: BaseException) -> _Bad:
        """What record() queues for an event it cannot turn into a row."""
        return _Bad(event if replay_of is None else (event, replay_of), exc)

    @property
    def stats(self) -> AuditStats:
        s, r = self._stats, self._rec
        s.recorded, s.refused, s.journal_errors = r.recorded, r.refused, r.journal_errors
        return s

    @property
    def _closing(self) -> bool:
        return self._rec.closing

    @_closing.setter
    def _closing(self, value: bool) -> None:
        self._rec.closing = value

    def _journal_failed(self) -> None:
        now = time.monotonic()
        if now - self._journal_warned > 10:
            self._journal_warned = now
            log.error("audit: cannot append to the journal in %s (disk full?); refusing "
                      "events", self._journal.dir if self._journal else "?")

    async def flush(self) -> None:
        """Returns once everything recorded so far is in the database or the spill file."""
        target = self.stats.recorded
        if self._durable >= target:
            return
        if self._task is None or self._task.done():
            raise RuntimeError("audit log is not running")
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, fut))
        self._wake()
        await fut

    async def wait_written_back(self, timeout: float) -> bool:
        """Waits until the spill file is empty (all rows in the database); False on timeout."""
        await self.flush()
        deadline = time.monotonic() + timeout
        while self._spill.pending or self._pending is not None:
            if time.monotonic() >= deadline:
                return False
            self._next_retry = 0.0  # retry now rather than at the end of the backoff
            self._wake()
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        """Flushes (to the database, or to the spill file if it is down) and stops."""
        if self._task is None:
            return
        self._closing = True
        self._wake()
        try:
            await self._task
        finally:
            if self._maint_task is not None:
                self._maint_task.cancel()
                await asyncio.gather(self._maint_task, return_exceptions=True)
            await self._in_io(self._spill.close)
            self._close_journal()
            await self._close()
            assert self._io is not None
            self._io.shutdown(wait=True)
            self._task = None

    def _close_journal(self) -> None:
        for fd, _ in self._orphans:  # not replayed yet: left for the next start
            os.close(fd)
        self._orphans = []
        j = self._journal
        if j is not None and j.fd >= 0:
            # every journaled row durable: nothing to replay, delete; else keep for next start
            j.close(remove=self._jdurable >= j.appended and self._pending is None)

    # ---- writer --------------------------------------------------------------------------

    def _wake(self) -> None:
        w = self._rec.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, timeout: float | None, wake_at: int) -> None:
        assert self._loop is not None
        fut = self._loop.create_future()
        self._rec.waiter, self._rec.wake_at = fut, wake_at
        handle = None if timeout is None else self._loop.call_later(timeout, _resolve, fut)
        try:
            await fut
        finally:
            self._rec.waiter = None
            if handle is not None:
                handle.cancel()

    async def _in_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _failed(self) -> None:
        assert self._loop is not None
        self._db_ok = False
        self._next_retry = self._loop.time() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_retry_interval)

    async def _take(self) -> list[Any]:
        rows, bad = self._rec.take(self.batch_rows)
        if bad:
            # A malformed event must neither block the log nor vanish: keep its repr.
            await self._reject([(repr(x.item), repr(x.error)) for x in bad])
            self._mark_durable(len(bad), journaled=False)
        return rows

    def _mark_durable(self, n: int, journaled: bool = True) -> None:
        self._durable += n
        j = self._journal
        if journaled and j is not None and j.fd >= 0:
            # rows become durable in the order they were recorded (the queue is FIFO, a
            # failed batch is retried before newer ones), so a count is a journal position
            self._jdurable += n
            done = j.release(self._jdurable)
            if done:
                self._discard(done)
        if self._flush_waiters:
            done = self._durable
            keep = []
            for target, fut in self._flush_waiters:
                if target <= done:
                    _resolve(fut)
                else:
                    keep.append((target, fut))
            self._flush_waiters = keep

    def _discard(self, segments: list[Closed]) -> None:
        """Recycles released journal segments on the I/O thread (in order with its other
        work): zeroing, unmapping or freeing a segment on the loop stalled it."""
        j = self._journal
        assert j is not None
        try:
            if self._io is not None:
                self._io.submit(j.recycle, segments)
                return
        except RuntimeError:  # the executor is shut down: closing
            pass
        Journal.discard_all([seg for seg, _used in segments])

    async def _run(self) -> None:
        assert self._loop is not None
        loop, q = self._loop, self._queue
        if self._orphans:
            await self._recover()
        self._next_scan = loop.time() + self.orphan_scan_interval
        while True:
            try:
                if self._journal is not None and loop.time() >= self._next_scan \
                        and not self._closing:
                    self._next_scan = loop.time() + self.orphan_scan_interval
                    self._orphans += await self._in_io(self._journal.claim_orphans)
                    if self._orphans:
                        await self._recover()
                if not q and self._pending is None:
                    if self._closing:
                        if self._spill.pending and self._db_ok:
                            await self._write_back(until_empty=True)
                        return
                    timeout = None
                    if self._spill.pending:
                        timeout = max(0.0, self._next_retry - loop.time())
                    if self._journal is not None:
                        scan = max(0.0, self._next_scan - loop.time())
                        timeout = scan if timeout is None else min(timeout, scan)
                    await self._wait(timeout, 1)
                if (q and len(q) < self.batch_rows and self._pending is None
                        and not self._closing and not self._flush_waiters
                        and self.flush_interval > 0):
                    # Let a batch build up, also after the first row of a quiet spell: one
                    # transaction per flush_interval, not one per sparse event.
                    await self._wait(self.flush_interval, self.batch_rows)
                if self._pending is not None or q:
                    batch, self._pending = self._pending or await self._take(), None
                    if batch:
                        await self._commit(batch)
                if self._spill.pending and loop.time() >= self._next_retry:
                    await self._write_back(until_empty=False)
            except Exception:  # a bug must not kill the writer: rows stay in _pending/queue
                log.exception("audit writer error")
                await asyncio.sleep(self._backoff)

    async def _recover(self) -> None:
        """Replays journals of dead processes: into the database, else the spill file."""
        while self._orphans:
            fd, path = self._orphans[0]
            try:
                rows = await self._in_io(Journal.read_rows, fd, path)
                for i in range(0, len(rows), self.batch_rows):
                    left = rows[i:i + self.batch_rows]
                    if self._db_ok and not self._spill.pending:
                        left = await self._write_db(left, again=True)
                    if left:
                        await self._in_io(self._spill.append, left)
                        self.stats.spilled_rows += len(left)
                self.stats.journal_replayed_rows += len(rows)
                self._orphans.pop(0)
                await self._in_io(Journal.discard, fd, path)
                if rows:  # a dead process's spare segments hold none
                    log.warning("audit: replayed %d rows from the journal %s of a process "
                                "that stopped without flushing", len(rows), path.name)
            except Exception:
                log.exception("audit: cannot replay journal %s; kept for the next start", path)
                self._orphans.pop(0)
                os.close(fd)

    async def _commit(self, rows: list[Any]) -> None:
        if self._db_ok and not self._spill.pending:
            left = await self._write_db(rows)
            if not left:
                self._mark_durable(len(rows))
                return
            # Unavailable: spill what the database did not take (may be a tail after poison).
            done = len(rows) - len(left)
            self._mark_durable(done)
            rows = left
        try:
            await self._in_io(self._spill.append, rows)
        except Exception:
            log.exception("audit: cannot append to spill file %s", self._spill.path)
            self._pending = rows  # refuses new events once the queue fills: backpressure
            await asyncio.sleep(self._backoff)
            return
        self.stats.spilled_rows += len(rows)
        self._mark_durable(len(rows))

    async def _write_db(self, rows: list[Any], again: bool = False) -> list[Any]:
        """Writes rows; returns those left unwritten because the database is unavailable."""
        t0 = time.perf_counter()
        try:
            await self._write(rows, again)
        except Exception as exc:
            self.stats.write_errors += 1
            if not self._is_poison(exc):
                log.warning("audit: %s write failed (%r); spilling", self.backend, exc)
                self._failed()
                return rows
            return await self._isolate_poison(rows, exc, again)
        dt = time.perf_counter() - t0
        s = self.stats
        s.rows_written += len(rows)
        s.batches += 1
        s.last_write_latency = dt
        s.last_batch_rows = len(rows)
        s.write_seconds += dt
        self._db_ok = True
        self._backoff = self.retry_interval
        return []

    async def _isolate_poison(self, rows: list[Any], exc: BaseException,
                              again: bool) -> list[Any]:
        """Writes rows one by one to find the invalid ones, which go to audit.rejected.jsonl."""
        log.error("audit: batch of %d refused (%r); isolating invalid rows", len(rows), exc)
        bad = []
        for i, row in enumerate(rows):
            try:
                await self._write([row], again)
            except Exception as e:
                if not self._is_poison(e):
                    self._failed()
                    await self._reject(bad)
                    return rows[i:]
                bad.append((row, repr(e)))
            else:
                self.stats.rows_written += 1
        await self._reject(bad)
        return []

    async def _reject(self, bad: list[tuple[Any, str]]) -> None:
        if not bad:
            return

        def append() -> None:
            with open(self._rejected_path, "ab") as f:
                for row, err in bad:
                    f.write(dumps({"row": row, "error": err}) + b"\n")
                f.flush()
                os.fsync(f.fileno())

        await self._in_io(append)
        self.stats.rejected_rows += len(bad)

    async def _write_back(self, until_empty: bool) -> None:
        """Writes spilled frames back in file order; stops at the first unavailability.

        Yields to new events: unless closing, stops once a full batch is waiting in the queue.
        """
        while self._spill.pending:
            if not self._db_ok:
                try:
                    await self._open()
                except Exception as exc:
                    log.warning("audit: %s still unavailable (%r)", self.backend, exc)
                    self._failed()
                    return
            rows, end = await self._in_io(self._spill.read, self.batch_rows)
            left = await self._write_db(rows, again=True)
            if left:
                return
            self.stats.replayed_rows += len(rows)
            await self._in_io(self._spill.advance, end, len(rows))
            if not self._spill.pending:
                log.warning("audit: spill file written back, %s healthy", self.backend)
            if not until_empty and len(self._queue) >= self.batch_rows:
                return

    async def _maintain(self) -> None:
        while True:
            try:
                await self._maintain_once()
            except Exception as exc:
                log.warning("audit maintenance failed: %r", exc)
            await asyncio.sleep(self.maintenance_interval)
