"""The audit's write-ahead journal: an accepted event survives a crash of the process.

`AuditLog.record()` copies each row into the journal before it returns True, so the answer
(202/200) is only sent for an event that is already in the kernel's page cache: the live
segment is a shared file mapping, and a store into it is a store into the page cache, with no
system call (a write(2) per event cost ~50 us at low rates: each one updated the file's mtime
through the filesystem's journal). That survives `kill -9`, an OOM kill or a segfault of the
worker; it does NOT survive a power loss or a kernel crash: there is deliberately no fsync on
this path (it would cost milliseconds per event). Durability against power loss starts once
the writer task has committed the batch to PostgreSQL or fsync'd it to the spill file; SQLite
runs at synchronous=NORMAL, so its commit survives a crash of the process, not a power loss.

Layout: `<data_dir>/journal/<pid>-<n>.wal` segments (one live process appends to one segment at a
time), frames as in the spill file: [u32 BE length][u32 crc32][orjson array of rows] (here one
row per frame). A segment is created at its full size with its blocks reserved
(posix_fallocate: a store into a mapping can never meet a full disk, which would be SIGBUS);
its unused tail is zeros, where a replay ends. A frame torn by a crash mid-copy fails its CRC
and ends the replay of that file too.

Ownership is an exclusive `flock` held on every segment for as long as its process lives and
the file exists; the kernel drops it when the process dies, however it dies. A segment is
created under a temporary name, locked, and only then renamed to `.wal`, so another process
never sees an unlocked live segment. On start, any `.wal` that can be locked is an orphan (its
writer is gone: a killed worker of any slot, an old generation after a reload, or a stop that
could not flush): the new process replays it into the database (or its own fsync'd spill file)
and deletes it. A replayed row that was already written lands once all the same: SQLite looks
it up first, PostgreSQL ignores it by its primary key.

Reclaiming space: a segment is rotated when the next frame does not fit in `rotate_bytes`,
and also once everything recorded so far is durable and it has grown past `truncate_bytes`.
Once every row recorded up to its end is durable, a closed segment is recycled: its used
part is zeroed and it waits, still mapped and locked, to be the next live segment (up to
`SPARES` of them; any other is unmapped and deleted). Both run on the audit's I/O thread,
never on the event loop (they take from ~0.1 to a few milliseconds). A fresh segment's pages
each cost a page fault on the first store and a free on deletion, ~1 us per frame in all (a
tenth of an API request); a recycled segment's pages are still in the page cache and mapped.
A clean close deletes the segments when everything was flushed.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from ._journal import FrameWriter, JournalBase, frame_rows, zero
from .spill import read_frame

log = logging.getLogger("fastrelay.audit")

SUFFIX = ".wal"
_counter = itertools.count()


Segment = tuple[int, Path, mmap.mmap]  # fd, path, its mapping
Closed = tuple[Segment, int]  # a closed segment and the bytes of it that were used
SPARES = 2  # recycled segments kept: the live one rotates into one while another is zeroed


class Journal(JournalBase):
    """A process's journal. `append` (the hot path: one frame into the live segment) and the
    `_out`/`appended` state it uses are in C (`_journal.JournalBase`)."""

    def __init__(self, directory: Path, *, rotate_bytes: int = 4 << 20,
                 truncate_bytes: int = 1 << 20) -> None:
        self.dir = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.truncate_bytes = truncate_bytes
        self.fd = -1
        self.path: Path | None = None
        self.map: mmap.mmap | None = None  # the live segment, appended to by self._out
        self._closed: deque[tuple[int, Closed]] = deque()  # (end position, segment)
        # zeroed segments of rotate_bytes for _rotate: filled by recycle() on the I/O thread,
        # taken on the loop (deque's append and popleft are atomic)
        self._spares: deque[Segment] = deque()

    # ---- hot path (event loop thread) -----------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes used in the live segment."""
        return self._out.size if self._out is not None else 0

    def release(self, durable: int) -> list[Closed]:
        """`durable` rows (in append order) are in the database or the spill file. Returns
        the segments that can go, for the caller to recycle off the event loop."""
        if durable >= self.appended and self.size >= self.truncate_bytes:
            self._rotate(0)  # all of the live segment is durable: it can go as a whole
        done = []
        closed = self._closed
        while closed and closed[0][0] <= durable:
            done.append(closed.popleft()[1])
        return done

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fd, self.path, self.map = self._new_segment(self.rotate_bytes)
        self._out = FrameWriter(self.map)

    def _new_segment(self, size: int) -> Segment:
        name = f"{os.getpid()}-{int(time.time() * 1000)}-{next(_counter)}"
        tmp = self.dir / f"{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: cannot be contended
            os.posix_fallocate(fd, 0, size)  # ENOSPC here, as an error, not SIGBUS later
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            path = self.dir / f"{name}{SUFFIX}"
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        return fd, path, m

    def _rotate(self, need: int) -> bool:
        """A new live segment: a spare, or a fresh one (one frame larger than rotate_bytes
        gets its own size)."""
        try:
            if self._spares and need <= self.rotate_bytes:
                seg = self._spares.popleft()
            else:
                seg = self._new_segment(max(self.rotate_bytes, need))
        except OSError as e:
            log.warning("audit journal: cannot start a new segment: %r", e)
            return False
        if self.path is not None:
            used = self.size
            self._release_out()
            self._closed.append((self.appended, ((self.fd, self.path, self.map), used)))
        self.fd, self.path, self.map = seg
        self._out = FrameWriter(self.map)
        return True

    def close(self, remove: bool) -> None:
        """Closes (releasing the locks); deletes the segments when all rows are durable."""
        segs = [seg for _, (seg, _used) in self._closed]
        self._release_out()
        if self.path is not None:
            segs.append((self.fd, self.path, self.map))
        self._closed.clear()
        for fd, path, m in segs:
            m.close()
            if remove:
                _remove(fd, path)
            else:
                os.close(fd)
        self.discard_all(list(self._spares))  # zeros: nothing to replay
        self._spares.clear()
        self.fd, self.path, self.map = -1, None, None

    def _release_out(self) -> None:
        if self._out is not None:
            self._out.release()  # before the mapping is closed
            self._out = None

    # ---- recovery (blocking I/O: the spill thread) ------------------------------------------

    def claim_orphans(self) -> list[tuple[int, Path]]:
        """Locks every segment whose writer is gone; returns (fd, path), oldest first."""
        out = []
        try:
            names = sorted(self.dir.iterdir(), key=_mtime)
        except FileNotFoundError:
            return out
        now = time.time()
        for path in names:
            if path.suffix == ".tmp" and now - _mtime(path) > 60:
                _unlink(path)  # a creator that died between open and rename: empty
                continue
            if path.suffix != SUFFIX:
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive
                os.close(fd)
                continue
            if os.fstat(fd).st_nlink == 0:  # deleted by the previous claimer meanwhile
                os.close(fd)
                continue
            out.append((fd, path))
        return out

    @staticmethod
    def read_rows(fd: int, path: Path) -> list[Any]:
        """Every row of a segment, up to the first torn or corrupt frame."""
        size = os.fstat(fd).st_size
        off, rows = 0, []
        while (f := read_frame(fd, off, size)) is not None:
            off, payload = f
            rows.extend(frame_rows(payload))
        if off < size and os.pread(fd, 8, off) != bytes(min(8, size - off)):  # zeros: unused
            log.error("audit journal: %s has %d unreadable bytes at offset %d (torn by a "
                      "crash); %d rows before them are replayed", path, size - off, off,
                      len(rows))
        return rows

    @staticmethod
    def discard(fd: int, path: Path) -> None:
        _remove(fd, path)

    def recycle(self, closed: list[Closed]) -> None:
        """Zeroes released segments into spares, or deletes them (the I/O thread's work)."""
        for seg, used in closed:
            if len(self._spares) < SPARES and len(seg[2]) == self.rotate_bytes:
                zero(seg[2], used)  # its rows are durable: a crash midway replays a few again
                self._spares.append(seg)
            else:
                self.discard_all([seg])

    @staticmethod
    def discard_all(segments: list[Segment]) -> None:
        for fd, path, m in segments:
            m.close()  # unmapping written pages: ~0.8 ms for 16 MB
            _remove(fd, path)


def _remove(fd: int, path: Path) -> None:
    _unlink(path)  # unlink before close: the lock is held until the name is gone
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("audit journal: cannot remove %s: %r", path, e)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
