"""The local append-only spill file that keeps audit batches while the database is away.

Format: frames of [u32 big-endian payload length][u32 crc32 of payload][payload], where the
payload is an orjson array of rows. The CRC lets a torn tail (crash mid-append) be told apart
from data. Every method does blocking I/O and must run on the log's spill thread, never on the
event loop; they are only called one at a time (by the writer task), so there is no locking.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("fastrelay.audit")

_HEADER = struct.Struct(">II")
_MAX_FRAME = 1 << 30  # larger lengths can only come from corruption


def dumps(rows: Any) -> bytes:
    try:
        return orjson.dumps(rows)
    except orjson.JSONEncodeError:
        # Lone surrogates: orjson refuses them, stdlib json escapes them (\\ud800).
        return json.dumps(rows, ensure_ascii=True, default=str).encode()


def loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(payload)


def frame(payload: bytes) -> bytes:
    """[u32 BE length][u32 crc32][payload]: the spill file's unit, and the journal's (which
    audit/_journal.pyx writes from C in the same layout)."""
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_frame(fd: int, off: int, size: int) -> tuple[int, bytes] | None:
    """The whole frame at off in a file of size bytes: (its end, its payload), or None when
    what is there is torn, corrupt or absent."""
    if size - off < _HEADER.size:
        return None
    length, crc = _HEADER.unpack(os.pread(fd, _HEADER.size, off))
    end = off + _HEADER.size + length
    if length == 0 or length > _MAX_FRAME or end > size:  # 0: a journal's unused zeros
        return None
    payload = os.pread(fd, length, off + _HEADER.size)
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return end, payload


class SpillFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._size = 0  # bytes in the file (all valid frames)
        self._read_off = 0  # bytes already written back to the database
        self.pending_rows = 0  # rows between _read_off and _size

    @property
    def pending(self) -> bool:
        return self._size > self._read_off

    def open(self) -> int:
        """Opens (creating) the file and validates leftover frames; returns leftover rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        size = os.fstat(self._fd).st_size
        off, rows = 0, 0
        while off < size:
            frame = self._read_frame(off, size)
            if frame is None:
                break
            off, payload = frame
            rows += len(loads(payload))
        if off < size:
            # A torn tail from a crash mid-append, or corruption: keep the bytes for a human,
            # but cut them off so new frames are readable again.
            aside = self.path.with_name(f"{self.path.name}.bad-{int(time.time())}")
            with open(self.path, "rb") as src, open(aside, "wb") as dst:
                src.seek(off)
                dst.write(src.read())
                dst.flush()
                os.fsync(dst.fileno())
            log.error("audit spill: %d unreadable bytes at offset %d moved to %s",
                      size - off, off, aside)
            os.ftruncate(self._fd, off)
            os.fsync(self._fd)
        self._size = off
        self._read_off = 0
        self.pending_rows = rows
        return rows

    def _read_frame(self, off: int, size: int) -> tuple[int, bytes] | None:
        return read_frame(self._fd, off, size)

    def append(self, rows: list[Any]) -> None:
        """Appends one batch durably (fsync) or raises, leaving the file as it was."""
        payload = dumps(rows)
        data = frame(payload)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            try:  # drop the partial frame so the file stays a sequence of whole frames
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(data)
        self.pending_rows += len(rows)

    def read(self, max_rows: int) -> tuple[list[Any], int]:
        """Whole frames from the read position, up to about max_rows rows; returns the end."""
        off, out = self._read_off, []
        while off < self._size and len(out) < max_rows:
            frame = self._read_frame(off, self._size)
            if frame is None:  # cannot happen for frames we validated or wrote ourselves
                raise OSError(f"audit spill {self.path} is corrupt at offset {off}")
            off, payload = frame
            out.extend(loads(payload))
        return out, off

    def advance(self, end: int, rows: int) -> None:
        """Marks frames up to `end` as written back; empties the file once all are."""
        self._read_off = end
        self.pending_rows = max(0, self.pending_rows - rows)
        if self._read_off >= self._size:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self._size = self._read_off = 0
            self.pending_rows = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
