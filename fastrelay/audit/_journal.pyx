# cython: language_level=3
"""The audit's hot path, in C: `Recorder.record` (an accepted event's row journaled and
queued for the writer task), `JournalBase.append` (journal.Journal's frame append) and
`FrameWriter`, which stores the row's frame into the live journal segment's shared mapping,
[u32 BE length][u32 BE crc32][payload] (spill.frame's layout).

In Python, framing and copying a row (struct.pack, a concatenation, an mmap slice
assignment, three attribute updates) ran ~7,500 instructions on every event, and at a steady
10,000 events/s, with cold caches between requests, cost ~5 us of the worker's CPU each.
AuditLog.record in Python (four frames: the room check, the row, the JSON, the journal) ran
~2,300 instructions more per event than the Recorder does.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcpy


cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int n)

from fastrelay._core cimport Event

import orjson

from .spill import dumps as _safe_dumps

cdef object _dumps = orjson.dumps
cdef object _EncodeError = orjson.JSONEncodeError


cdef class FrameWriter:
    """Appends frames to a writable mapping (a journal segment) until it is full."""

    cdef Py_buffer view
    cdef bint held
    cdef readonly Py_ssize_t size  # bytes used: frames are appended here

    def __cinit__(self, mapping):
        PyObject_GetBuffer(mapping, &self.view, PyBUF_WRITABLE)
        self.held = True
        self.size = 0

    def __dealloc__(self):
        self.release()

    cpdef bint put(self, bytes payload) except -1:
        """Stores one frame; False (nothing stored) when it does not fit."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef unsigned char* p
        cdef unsigned long crc
        if not self.held or n == 0 or n > 0xFFFFFFFF or self.size + 8 + n > self.view.len:
            return False
        crc = crc32(0, <const unsigned char*>PyBytes_AS_STRING(payload), <unsigned int>n)
        p = <unsigned char*>self.view.buf + self.size
        p[0], p[1], p[2], p[3] = (n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF
        p[4], p[5], p[6], p[7] = (crc >> 24) & 0xFF, (crc >> 16) & 0xFF, (crc >> 8) & 0xFF, crc & 0xFF
        memcpy(p + 8, PyBytes_AS_STRING(payload), n)
        self.size += 8 + n
        return True

    def release(self):
        """Lets go of the mapping (it cannot be closed while a view of it is held)."""
        if self.held:
            self.held = False
            PyBuffer_Release(&self.view)


cdef class JournalBase:
    """The journal's hot path, in C: journal.Journal is its subclass and owns the segments
    (`_rotate` starts a new live one). Through Journal.append in Python, the frame cost
    ~2,900 instructions per audited event more."""

    cdef public FrameWriter _out     # appends to the live segment; None when there is none
    cdef public long long appended   # rows appended over the journal's life (durability counts)

    cpdef bint append(self, bytes payload) except -1:
        """Frames one payload into the live segment; False (nothing appended) when a new
        segment was needed and the disk refused it."""
        if self._out is None or not self._out.put(payload):
            # a new segment is sized for the frame; an empty payload can never be framed
            if (not self._rotate(len(payload) + 8) or self._out is None
                    or not self._out.put(payload)):
                return False
        self.appended += 1
        return True


cdef bytes _encode(obj):
    try:
        return _dumps(obj)
    except _EncodeError:  # lone surrogates: spill.dumps escapes them
        return _safe_dumps(obj)


cdef class Recorder:
    """AuditLog.record's work, in C: the event's row journaled (framed into the live segment)
    and queued for the writer task, or refused. Its queue bound, closing flag, counters and
    the writer task's wake-up live here, where record() reads them without a dict lookup;
    AuditLog reads and sets them through this object."""

    cdef readonly object queue      # collections.deque, drained by the writer task
    cdef object _append             # queue.append
    cdef public Py_ssize_t capacity
    cdef public bint closing
    cdef public JournalBase journal  # journal.Journal, or None without one
    cdef public long long recorded, refused, journal_errors
    cdef public object waiter       # the writer task's future while it waits for rows
    cdef public Py_ssize_t wake_at  # ... and how many rows wake it
    cdef object on_bad              # (event, replay_of, exc) -> what to queue instead
    cdef object on_journal_failed   # () -> None: the journal refused a frame

    def __init__(self, queue, Py_ssize_t capacity, journal, on_bad, on_journal_failed):
        self.queue = queue
        self._append = queue.append
        self.capacity = capacity
        self.journal = journal
        self.on_bad = on_bad
        self.on_journal_failed = on_journal_failed
        self.wake_at = 1

    cpdef bint record(self, event, replay_of=None) except -1:
        """True once the row is journaled and queued; False: refuse the event (503)."""
        cdef Py_ssize_t n = len(self.queue)
        if n >= self.capacity or self.closing:
            self.refused += 1
            return False
        try:
            row = (<Event?>event).audit_row(replay_of)  # not an Event: TypeError, kept below
            data = (<tuple>row)[4]
            if type(data) is not str:  # a client event's object: the column holds text
                row = (<tuple>row)[:4] + (_encode(data).decode(),) + (<tuple>row)[5:]
        except Exception as exc:  # not an Event: the writer keeps it in audit.rejected.jsonl
            row = self.on_bad(event, replay_of, exc)
        else:
            j = self.journal
            if j is not None and not j.append(_encode((row,))):
                self.refused += 1
                self.journal_errors += 1
                self.on_journal_failed()
                return False
        self._append(row)
        self.recorded += 1
        w = self.waiter
        if w is not None and n + 1 >= self.wake_at and not w.done():
            w.set_result(None)
        return True
