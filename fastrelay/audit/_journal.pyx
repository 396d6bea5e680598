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
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH
from libc.string cimport memcpy, memset


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_ASCII(object s)

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <zlib.h>

    /* zlib's CRC-32 (the spill file's and Python's zlib.crc32), folded with carry-less
       multiplies where the CPU has them: zlib's table walk costs ~900 instructions and a few
       cache misses on a journal frame; this ~120. The constants are the reflected
       polynomial's fold and Barrett ones (Gopal et al., "Fast CRC Computation for Generic
       Polynomials Using PCLMULQDQ", Intel 2009). */
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #define FR_CLMUL(a, b, i) _mm_clmulepi64_si128((a), (b), (i))

    __attribute__((target("pclmul,sse4.1")))
    static __m128i fr_fold(__m128i acc, __m128i k, __m128i next) {
        return _mm_xor_si128(_mm_xor_si128(FR_CLMUL(acc, k, 0x00), FR_CLMUL(acc, k, 0x11)), next);
    }

    /* the CRC register (pre- and post-inverted by the caller) over n bytes, n >= 64 and a
       multiple of 16 */
    __attribute__((target("pclmul,sse4.1")))
    static uint32_t fr_crc32_fold(uint32_t reg, const unsigned char *p, size_t n) {
        const __m128i k4 = _mm_set_epi64x(0x01c6e41596, 0x0154442bd4);   /* 4 x 128 bits */
        const __m128i k1 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0);   /* 128 bits */
        const __m128i k96 = _mm_set_epi64x(0, 0x0163cd6124);
        const __m128i poly = _mm_set_epi64x(0x01f7011641, 0x01db710641);
        const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
        __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)reg));
        __m128i b = _mm_loadu_si128((const __m128i *)(p + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(p + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(p + 48));
        __m128i x, t;
        p += 64;
        n -= 64;
        for (; n >= 64; p += 64, n -= 64) {
            a = fr_fold(a, k4, _mm_loadu_si128((const __m128i *)p));
            b = fr_fold(b, k4, _mm_loadu_si128((const __m128i *)(p + 16)));
            c = fr_fold(c, k4, _mm_loadu_si128((const __m128i *)(p + 32)));
            d = fr_fold(d, k4, _mm_loadu_si128((const __m128i *)(p + 48)));
        }
        x = fr_fold(fr_fold(fr_fold(a, k1, b), k1, c), k1, d);
        for (; n >= 16; p += 16, n -= 16)
            x = fr_fold(x, k1, _mm_loadu_si128((const __m128i *)p));
        /* 128 -> 64 bits, then 96 -> 64, then Barrett down to 32 */
        x = _mm_xor_si128(_mm_srli_si128(x, 8), FR_CLMUL(x, k1, 0x10));
        x = _mm_xor_si128(FR_CLMUL(_mm_and_si128(x, low32), k96, 0x00), _mm_srli_si128(x, 4));
        t = FR_CLMUL(_mm_and_si128(x, low32), poly, 0x10);
        t = FR_CLMUL(_mm_and_si128(t, low32), poly, 0x00);
        return (uint32_t)_mm_extract_epi32(_mm_xor_si128(x, t), 1);
    }

    static int fr_has_clmul = -1;

    static unsigned long fr_crc32(unsigned long crc, const unsigned char *p, size_t n) {
        size_t bulk = n & ~(size_t)15;
        if (fr_has_clmul < 0)
            fr_has_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
        if (bulk >= 64 && fr_has_clmul) {
            crc = ~fr_crc32_fold(~(uint32_t)crc, p, bulk) & 0xffffffffUL;
            p += bulk;
            n -= bulk;
        }
        return n ? crc32(crc, p, (unsigned int)n) : crc;
    }
    #else
    static unsigned long fr_crc32(unsigned long crc, const unsigned char *p, size_t n) {
        return crc32(crc, p, (unsigned int)n);
    }
    #endif
    """
    unsigned long fr_crc32(unsigned long crc, const unsigned char* buf, size_t n) nogil

from fastrelay._core cimport Event

import orjson

from .spill import dumps as _safe_dumps
from .spill import loads as _loads

cdef object _dumps = orjson.dumps
cdef object _EncodeError = orjson.JSONEncodeError


def zero(mapping, Py_ssize_t n) -> None:
    """Zeroes a mapping's first n bytes, without the GIL (the audit's I/O thread recycles a
    closed journal segment with it)."""
    cdef Py_buffer view
    PyObject_GetBuffer(mapping, &view, PyBUF_WRITABLE)
    try:
        if n < 0 or n > view.len:
            raise ValueError(f"cannot zero {n} bytes of a {view.len}-byte mapping")
        with nogil:
            memset(view.buf, 0, n)  # forward: a crash midway leaves zeros first
    finally:
        PyBuffer_Release(&view)


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

    cdef unsigned char* _reserve(self, Py_ssize_t n):
        """Where a payload of n bytes goes, or NULL when its frame does not fit."""
        if not self.held or n == 0 or n > 0xFFFFFFFF or self.size + 8 + n > self.view.len:
            return NULL
        return <unsigned char*>self.view.buf + self.size + 8

    cdef void _seal(self, Py_ssize_t n):
        """Heads the payload just stored at the end with its length and CRC."""
        cdef unsigned char* p = <unsigned char*>self.view.buf + self.size
        cdef unsigned long crc = fr_crc32(0, p + 8, <size_t>n)
        p[0], p[1], p[2], p[3] = (n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF
        p[4], p[5], p[6], p[7] = (crc >> 24) & 0xFF, (crc >> 16) & 0xFF, (crc >> 8) & 0xFF, crc & 0xFF
        self.size += 8 + n

    cpdef bint put(self, bytes payload) except -1:
        """Stores one frame; False (nothing stored) when it does not fit."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef unsigned char* p = self._reserve(n)
        if p == NULL:
            return False
        memcpy(p, PyBytes_AS_STRING(payload), n)
        self._seal(n)
        return True

    cdef bint put_row(self, tuple row, Py_ssize_t n):
        """Stores one row in the binary layout (n: _row_size's); False when it does not fit."""
        cdef unsigned char* p = self._reserve(n)
        if p == NULL:
            return False
        _write_row(p, row)
        self._seal(n)
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

    cpdef bint append_row(self, tuple row) except -1:
        """Frames one row: in the binary layout, else (a column the layout has no tag for, a
        string UTF-8 cannot encode) as JSON; False as append's."""
        return self._append_row(row, _row_size(row))

    cdef bint _append_row(self, tuple row, Py_ssize_t n) except -1:
        """append_row, given the row's _row_size (the Recorder has measured it already)."""
        if n < 0:
            return self.append(_encode((row,)))
        if self._out is None or not self._out.put_row(row, n):
            if (not self._rotate(n + 8) or self._out is None
                    or not self._out.put_row(row, n)):
                return False
        self.appended += 1
        return True


# ---------------------------------------------------------------- the row layout
#
# A journal frame holds one row, either as JSON ([row], what the spill file's frames hold)
# or, from the Recorder, in this binary layout: ROW_FRAME, then the row's columns, each
# 'S' u32-LE-length UTF-8 | 'N' (None) | 'F' 8-byte double | 'T' u32 count, then count
# times u32 length and UTF-8 (the channels). Written straight from each string's UTF-8 into
# the mapping, it costs ~200 instructions where orjson's call and bytes object cost ~1,900.

cdef enum:
    ROW_FRAME = 1  # a payload's first byte; JSON's is '['
    NCOLS = 10     # base.COLUMNS


cdef Py_ssize_t _utf8_size(object s) except -2:
    """Bytes of a str's UTF-8, or -1 when it has none (a lone surrogate)."""
    cdef Py_ssize_t n
    if PyUnicode_IS_ASCII(s):
        return PyUnicode_GET_LENGTH(s)
    try:
        PyUnicode_AsUTF8AndSize(s, &n)  # cached on the str, for _write_row
    except UnicodeEncodeError:
        return -1
    return n


cdef Py_ssize_t _row_size(tuple row) except -2:
    """The row's binary payload size, or -1 when the layout cannot hold it."""
    cdef Py_ssize_t size = 1, i, n
    if len(row) != NCOLS:
        return -1
    for i in range(NCOLS):
        v = row[i]
        if v is None:
            size += 1
        elif type(v) is str:
            n = _utf8_size(v)
            if n < 0:
                return -1
            size += 5 + n
        elif type(v) is float:
            size += 9
        elif type(v) is tuple and i == 2:
            size += 5
            for c in <tuple>v:
                if type(c) is not str:
                    return -1
                n = _utf8_size(c)
                if n < 0:
                    return -1
                size += 4 + n
        else:
            return -1
    return size


cdef inline unsigned char* _put_u32(unsigned char* p, size_t v) noexcept:
    p[0], p[1], p[2], p[3] = v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF, (v >> 24) & 0xFF
    return p + 4


cdef inline unsigned char* _put_utf8(unsigned char* p, object s):
    cdef Py_ssize_t n
    cdef const char* u = PyUnicode_AsUTF8AndSize(s, &n)  # cannot fail: _row_size checked
    p = _put_u32(p, <size_t>n)
    memcpy(p, u, n)
    return p + n


cdef void _write_row(unsigned char* p, tuple row):
    """The row, as _row_size measured it (which checked every column)."""
    cdef Py_ssize_t i
    cdef double d
    p[0] = ROW_FRAME
    p += 1
    for i in range(NCOLS):
        v = row[i]
        if v is None:
            p[0] = b'N'
            p += 1
        elif type(v) is str:
            p[0] = b'S'
            p = _put_utf8(p + 1, v)
        elif type(v) is float:
            p[0] = b'F'
            d = PyFloat_AS_DOUBLE(v)
            memcpy(p + 1, &d, 8)  # the host's byte order: a journal is replayed where it was written
            p += 9
        else:
            p[0] = b'T'
            p = _put_u32(p + 1, <size_t>len(<tuple>v))
            for c in <tuple>v:
                p = _put_utf8(p, c)


cdef class _Reader:
    cdef const unsigned char* p
    cdef const unsigned char* end

    cdef const unsigned char* take(self, Py_ssize_t n) except NULL:
        cdef const unsigned char* at = self.p
        if n < 0 or self.end - self.p < n:
            raise ValueError("a journal row frame ends early")
        self.p += n
        return at

    cdef Py_ssize_t u32(self) except -1:
        cdef const unsigned char* q = self.take(4)
        return q[0] | (q[1] << 8) | (q[2] << 16) | (<Py_ssize_t>q[3] << 24)

    cdef str utf8(self):
        cdef Py_ssize_t n = self.u32()
        return PyUnicode_DecodeUTF8(<const char*>self.take(n), n, NULL)


def frame_rows(bytes payload) -> list:
    """The rows of one journal frame's payload, in either layout (the replay's reader)."""
    cdef _Reader r
    cdef Py_ssize_t i, k
    cdef double d
    cdef const unsigned char* tag
    if PyBytes_GET_SIZE(payload) == 0 or (<const unsigned char*>PyBytes_AS_STRING(payload))[0] != ROW_FRAME:
        return _loads(payload)
    r = _Reader()
    r.p = <const unsigned char*>PyBytes_AS_STRING(payload) + 1
    r.end = <const unsigned char*>PyBytes_AS_STRING(payload) + PyBytes_GET_SIZE(payload)
    row = []
    for i in range(NCOLS):
        tag = r.take(1)
        if tag[0] == b'N':
            row.append(None)
        elif tag[0] == b'S':
            row.append(r.utf8())
        elif tag[0] == b'F':
            memcpy(&d, r.take(8), 8)
            row.append(d)
        elif tag[0] == b'T':
            row.append(tuple([r.utf8() for k in range(r.u32())]))
        else:
            raise ValueError(f"a journal row frame has an unknown tag {tag[0]}")
    if r.p != r.end:
        raise ValueError("a journal row frame has bytes past its row")
    return [tuple(row)]


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
        cdef Py_ssize_t n = len(self.queue), size
        cdef JournalBase j
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
            size = _row_size(<tuple>row)
            j = self.journal
            if j is not None and not j._append_row(<tuple>row, size):
                self.refused += 1
                self.journal_errors += 1
                self.on_journal_failed()
                return False
            if size >= 0:
                # Strings and floats (what the binary layout holds) cannot form a cycle. The
                # row sits in the queue for up to a flush interval, where every young
                # collection traversed it and promoted it towards the old generation
                # (CPython untracks such tuples only once a collection has visited them).
                PyObject_GC_UnTrack(<void*>(<tuple>row)[2])
                PyObject_GC_UnTrack(<void*>row)
        self._append(row)
        self.recorded += 1
        w = self.waiter
        if w is not None and n + 1 >= self.wake_at and not w.done():
            w.set_result(None)
        return True

    def take(self, Py_ssize_t n):
        """The writer task's next batch: up to n queued items, oldest first, split into
        (rows, others); the others are what on_bad queued in place of a row."""
        cdef list items, rows, others = []
        q = self.queue
        if n >= len(q):
            items = list(q)
            q.clear()
        else:
            pop = q.popleft
            items = [pop() for _ in range(n)]
        for x in items:
            if type(x) is not tuple:
                others.append(x)
        if not others:
            return items, others
        rows = [x for x in items if type(x) is tuple]
        return rows, others


def crc32(data) -> int:
    """The frames' CRC (zlib.crc32's value), as FrameWriter computes it: for the tests."""
    cdef const unsigned char[::1] view = data
    return fr_crc32(0, &view[0] if view.shape[0] else NULL, view.shape[0])
