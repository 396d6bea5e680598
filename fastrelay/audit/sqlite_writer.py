"""The SQLite audit writer: a child process of each worker that commits the audit's batches.

Why a process and not a thread: a writer thread in the worker takes the GIL back and forth
with the event loop on every SQLite call; the futex hand-offs and the loop's waits for the
GIL cost more CPU than the whole request path and put milliseconds on delivery latency. A
child process shares nothing with the loop: the worker sends a batch down a pipe and reads
one answer back. The inserts run on the SQLite C API (_sqlite.pyx): through the stdlib module
the Python glue cost more than SQLite's own work.

Protocol on stdin/stdout, each message a little-endian u32 length and its bytes:
  request: the rows' batches, as _sqlite.pack lays them out
  answer:  b"K" (committed), b"P" + message (rows invalid: the caller isolates them),
           b"T" + message (transient: the caller spills and retries)
The writer exits at end of input (the worker closed the pipe), and is killed when its
worker dies (see die_with).
"""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
import struct
import sys
from pathlib import Path

from ._sqlite import Poison, Writer

FRAME = struct.Struct("<I")  # each message's length
# rows the database refuses as invalid (retrying never helps); OperationalError (locked, I/O,
# disk full) is transient. ValueError/TypeError: encoding (UnicodeError, orjson).
POISON = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
          sqlite3.ProgrammingError, ValueError, TypeError)


# every connection to the audit database, the writer child's (C API) and the worker's
# (schema, queries, retention). NORMAL (with WAL): a commit survives a crash of the process,
# as the journal does (it is not fsync'd either); a power loss can take the last batches.
# FULL fsync'd every batch and cost as much CPU as the rest of the request path.
# page_size applies to a new file only (before WAL is set): 16 KiB pages cost the writer less
# per row than 4 KiB ones (fewer splits and page writes).
PRAGMAS = ("PRAGMA page_size=16384", "PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL",
           "PRAGMA busy_timeout=10000")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


def _read_exactly(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def yield_cpu() -> None:
    """SCHED_IDLE: run only on a core nothing else wants. At normal priority this process's
    commit bursts (a few ms per batch) took a core from the worker or its clients and put
    ~3 ms on the answers' p99 at 25k events/s; idle, 0.9 ms. Under sustained overload the
    audit queue is the buffer (then 503), and the writer catches up once the load eases."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


def die_with(parent: int) -> None:
    """SIGKILL when the worker dies. A batch in hand when the worker was killed (waiting for
    SQLite's lock, say) must not be committed later: the next worker replays the dead one's
    journal, looks up which rows are stored, and writes the rest; a commit landing after
    that look stored rows twice. Killed, the batch's transaction never commits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: end of input still stops us
        return
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(0)


def main(path: str, parent: int) -> None:
    die_with(parent)
    # the worker decides when we stop (end of input), not a signal sent to the whole group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # answers go to a private copy of stdout: a stray print must not corrupt the protocol
    out = os.dup(1)
    os.dup2(2, 1)
    yield_cpu()
    gc.disable()  # the loop makes no cycles; young collections were a few % of its CPU
    writer = Writer(path, PRAGMAS)
    while True:
        head = _read_exactly(0, FRAME.size)
        if head is None:
            break
        body = _read_exactly(0, FRAME.unpack(head)[0])
        if body is None:
            break
        try:
            writer.write(body)
            answer = b"K"
        except (Poison, ValueError, TypeError) as exc:
            answer = b"P" + repr(exc).encode()
        except Exception as exc:  # locked, I/O error, disk full: worth retrying
            answer = b"T" + repr(exc).encode()
        os.write(out, FRAME.pack(len(answer)) + answer)
    writer.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
