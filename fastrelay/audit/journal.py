"""The audit's write-ahead journal: an accepted event survives a crash of the process.

`AuditLog.record()` appends each row to the journal with one write(2) before it returns
True, so the answer (202/200) is only sent for an event that is already in the kernel's page
cache. That survives `kill -9`, an OOM kill or a segfault of the worker; it does NOT survive a
power loss or a kernel crash: there is deliberately no fsync on this path (it would cost
milliseconds per event). Durability against power loss starts once the writer task has
committed the batch to PostgreSQL or fsync'd it to the spill file; SQLite runs at
synchronous=NORMAL, so its commit survives a crash of the process, not a power loss.

Layout: `<data_dir>/journal/<pid>-<n>.wal` segments (one live process appends to one segment at a
time), frames as in the spill file: [u32 BE length][u32 crc32][orjson array of rows] (here one
row per frame). A frame torn by a crash mid-write fails its CRC and ends the replay of that file.

Ownership is an exclusive `flock` held on every segment for as long as its process lives and
the file exists; the kernel drops it when the process dies, however it dies. A segment is
created under a temporary name, locked, and only then renamed to `.wal`, so another process
never sees an unlocked live segment. On start, any `.wal` that can be locked is an orphan (its
writer is gone: a killed worker of any slot, an old generation after a reload, or a stop that
could not flush): the new process replays it into the database (or its own fsync'd spill file)
and deletes it. Rows are idempotent by primary key, so a row replayed that was already written
lands exactly once.

Reclaiming space: a segment is rotated at `rotate_bytes`, and also once everything recorded
so far is durable and it has grown past `truncate_bytes`; a closed segment is deleted (on the
audit's I/O thread, never on the event loop) once every row recorded up to its end is durable.
A clean close deletes the segments when everything was flushed.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from .._core import write_holding_gil
from .spill import loads, read_frame

log = logging.getLogger("fastrelay.audit")

SUFFIX = ".wal"
_counter = itertools.count()


class Journal:
    def __init__(self, directory: Path, *, rotate_bytes: int = 16 << 20,
                 truncate_bytes: int = 1 << 20) -> None:
        self.dir = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.truncate_bytes = truncate_bytes
        self.fd = -1
        self.path: Path | None = None
        self.size = 0
        self.appended = 0  # rows appended over the journal's life (positions for durability)
        self._closed: deque[tuple[int, int, Path]] = deque()  # (end position, fd, path)

    # ---- hot path (event loop thread) -----------------------------------------------------

    def append(self, data: bytes) -> bool:
        """One write(2) of a whole frame; False (nothing appended) if the disk refused it."""
        try:
            n = write_holding_gil(self.fd, data)
        except OSError:
            return False
        if n != len(data):  # disk full mid-frame: cut it off so the file stays whole frames
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            return False
        self.size += n
        self.appended += 1
        if self.size >= self.rotate_bytes:
            self._rotate()
        return True

    def release(self, durable: int) -> list[tuple[int, Path]]:
        """`durable` rows (in append order) are in the database or the spill file. Returns
        the segments that can go, for the caller to delete off the event loop: freeing a
        segment's blocks (unlink, close) stalled the loop for milliseconds."""
        if durable >= self.appended and self.size >= self.truncate_bytes:
            self._rotate()  # all of the live segment is durable: it can go as a whole
        done = []
        closed = self._closed
        while closed and closed[0][0] <= durable:
            _, fd, path = closed.popleft()
            done.append((fd, path))
        return done

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fd, self.path = self._new_segment()
        self.size = 0

    def _new_segment(self) -> tuple[int, Path]:
        name = f"{os.getpid()}-{int(time.time() * 1000)}-{next(_counter)}"
        tmp = self.dir / f"{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: cannot be contended
        path = self.dir / f"{name}{SUFFIX}"
        os.rename(tmp, path)
        return fd, path

    def _rotate(self) -> None:
        try:
            fd, path = self._new_segment()
        except OSError as e:  # keep appending to the current one
            log.warning("audit journal: cannot rotate: %r", e)
            return
        assert self.path is not None
        self._closed.append((self.appended, self.fd, self.path))
        self.fd, self.path, self.size = fd, path, 0

    def close(self, remove: bool) -> None:
        """Closes (releasing the locks); deletes the segments when all rows are durable."""
        segs = [*self._closed, (self.appended, self.fd, self.path)]
        self._closed.clear()
        for _, fd, path in segs:
            if fd < 0 or path is None:
                continue
            if remove:
                _remove(fd, path)
            else:
                os.close(fd)
        self.fd, self.path = -1, None

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
            rows.extend(loads(payload))
        if off < size:
            log.error("audit journal: %s has %d unreadable bytes at offset %d (torn by a "
                      "crash); %d rows before them are replayed", path, size - off, off,
                      len(rows))
        return rows

    @staticmethod
    def discard(fd: int, path: Path) -> None:
        _remove(fd, path)

    @staticmethod
    def discard_all(segments: list[tuple[int, Path]]) -> None:
        for fd, path in segments:
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
