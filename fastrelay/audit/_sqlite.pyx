# cython: language_level=3
"""The SQLite audit's batches: `pack` (in the worker) turns queued rows into the writer
child's request, and the child's `Writer` commits it through the SQLite C API.

The database keeps each batch of rows whole: one row of audit_batches per app and id prefix
(its rows as one JSON array), one audit_batch_channels entry per channel the batch names and
one audit_batch_names entry per event name.
A row per event cost the child ~4-10 us of CPU per event in SQLite's B-trees (the table, its
id and app indexes, the channel table), on the other core, where it also slowed the worker;
a batch costs that once per ~1,000 events. Queries decode the few batches their bounds select
(sqlite.py).

Request layout: one or more packs back to back, committed in one transaction; a pack is
  [u32 LE length of the head][head: JSON array, one item per batch:
  [app_id, first_id, last_id, first_at, last_at, count, channels, names, nbytes]]
  [each batch's rows, nbytes each, back to back, in the head's order]
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AsDouble
from cpython.unicode cimport PyUnicode_Check
from libc.string cimport memchr, memcmp

import orjson

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_ASCII(object s)

cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3
    ctypedef struct sqlite3_stmt
    ctypedef long long sqlite3_int64
    ctypedef void (*destructor_t)(void*)
    int SQLITE_OK, SQLITE_DONE, SQLITE_CONSTRAINT, SQLITE_MISMATCH, SQLITE_TOOBIG, SQLITE_RANGE
    int SQLITE_OPEN_READWRITE, SQLITE_OPEN_CREATE, SQLITE_OPEN_NOMUTEX
    destructor_t SQLITE_STATIC
    int sqlite3_open_v2(const char* path, sqlite3** db, int flags, const char* vfs)
    int sqlite3_close_v2(sqlite3* db)
    int sqlite3_exec(sqlite3* db, const char* sql, void* cb, void* arg, char** err)
    int sqlite3_prepare_v2(sqlite3* db, const char* sql, int n, sqlite3_stmt** st, const char** tail)
    int sqlite3_finalize(sqlite3_stmt* st)
    int sqlite3_reset(sqlite3_stmt* st)
    int sqlite3_step(sqlite3_stmt* st)
    int sqlite3_bind_text(sqlite3_stmt* st, int i, const char* s, int n, destructor_t d)
    int sqlite3_bind_blob(sqlite3_stmt* st, int i, const void* s, int n, destructor_t d)
    int sqlite3_bind_double(sqlite3_stmt* st, int i, double v)
    int sqlite3_bind_int64(sqlite3_stmt* st, int i, sqlite3_int64 v)
    sqlite3_int64 sqlite3_last_insert_rowid(sqlite3* db)
    int sqlite3_errcode(sqlite3* db)
    const char* sqlite3_errmsg(sqlite3* db)


class Poison(ValueError):
    """The rows are invalid: retrying never helps; the caller isolates them."""


class Transient(Exception):
    """Locked, busy, I/O error, disk full: worth retrying."""


# rows per stored batch at most: what a query decodes to find one event
cdef enum:
    _BATCH_ROWS = 1000
BATCH_ROWS = _BATCH_ROWS
# a batch's ids share their first PREFIX characters (ids start with 12 hex digits of ms: 8
# of them span 65.5 s), so get() looks for an id among the batches whose last id lies
# between it and the end of its prefix
PREFIX = 8
cdef int NCOLS = 10  # base.COLUMNS

cdef object _dumps = orjson.dumps
cdef object _loads = orjson.loads


# ---------------------------------------------------------------- worker side

cdef inline int _check_text(object v, int i, bint null_ok) except -1:
    if v is None and null_ok:
        return 0
    if not PyUnicode_Check(v):
        raise Poison(f"column {i}: expected text, got {type(v).__name__}")
    return 0


cdef tuple _checked(object row):
    """The row as a tuple in base.COLUMNS' layout, or Poison saying what is wrong."""
    cdef tuple r
    cdef const char* p
    cdef Py_ssize_t n
    if type(row) is tuple:
        r = <tuple>row
    elif type(row) is list:  # rows read back from the spill file
        r = tuple(<list>row)
    else:
        raise Poison(f"a row is a tuple or a list, not {type(row).__name__}")
    if len(r) != NCOLS:
        raise Poison(f"a row has {NCOLS} columns")
    _check_text(r[0], 0, False)
    _check_text(r[1], 1, False)
    _check_text(r[3], 3, False)
    _check_text(r[4], 4, False)
    _check_text(r[5], 5, True)
    _check_text(r[6], 6, False)
    _check_text(r[8], 8, True)
    _check_text(r[9], 9, True)
    if not PyUnicode_IS_ASCII(r[0]):
        raise Poison("an id is ASCII")
    p = PyUnicode_AsUTF8AndSize(r[0], &n)
    if n == 0 or memchr(p, 0x7F, n) != NULL:  # get() bounds a prefix by DEL
        raise Poison("an id is printable ASCII")
    chans = r[2]
    if (type(chans) is not tuple and type(chans) is not list) or not chans:
        raise Poison("channels is a non-empty list")
    for c in chans:
        if not PyUnicode_Check(c):
            raise Poison("a channel is text")
    t = r[7]
    if type(t) is not float and type(t) is not int:
        raise Poison("accepted_at is a number")
    return r


cdef bint _same_prefix(str a, str b) except -1:
    """a and b (ASCII) share their first PREFIX characters."""
    cdef Py_ssize_t na, nb
    cdef const char* pa = PyUnicode_AsUTF8AndSize(a, &na)
    cdef const char* pb = PyUnicode_AsUTF8AndSize(b, &nb)
    na = min(na, PREFIX)
    nb = min(nb, PREFIX)
    return na == nb and memcmp(pa, pb, na) == 0


cdef bint _before(tuple a, tuple b) except -1:
    """a sorts before b by (app_id, id)."""
    if a[1] is not b[1] and a[1] != b[1]:
        return a[1] < b[1]
    return a[0] < b[0]


cdef object _app_and_id(tuple r):
    return (r[1], r[0])


def pack(rows) -> bytes:
    """The writer child's request for these rows: one batch per app and id prefix, at most
    BATCH_ROWS rows each, rows in id order. Invalid rows raise Poison (a ValueError) or the
    JSON encoder's TypeError; the caller then isolates them."""
    cdef list rs = [_checked(row) for row in rows]
    cdef Py_ssize_t n = len(rs), i, j
    cdef tuple r, first
    cdef str name, last_name
    cdef double t, lo, hi
    # a worker's rows come in id order, one app at a time in the common case; journal
    # replays and several apps interleaved need the sort
    for i in range(1, n):
        if _before(<tuple>rs[i], <tuple>rs[i - 1]):
            rs.sort(key=_app_and_id)
            break
    heads = []
    blobs = []
    i = 0
    while i < n:
        first = <tuple>rs[i]
        j = i + 1
        while (j < n and j - i < _BATCH_ROWS and (<tuple>rs[j])[1] == first[1]
               and _same_prefix((<tuple>rs[j])[0], first[0])):
            j += 1
        run = rs[i:j]
        blob = _dumps(run)
        chans = set()
        names = set()
        last_chans = None
        last_name = None
        lo = hi = PyFloat_AsDouble(first[7])
        for r in run:
            # consecutive rows mostly name the same channels and event: a compare is
            # cheaper than hashing each row's new strings into the sets
            if r[2] != last_chans:
                last_chans = r[2]
                chans.update(last_chans)
            name = <str>r[3]
            if name != last_name:
                last_name = name
                names.add(name)
            t = PyFloat_AsDouble(r[7])
            if t < lo:
                lo = t
            elif t > hi:
                hi = t
        heads.append((first[1], first[0], (<tuple>rs[j - 1])[0], lo, hi, j - i, sorted(chans),
                      sorted(names), len(blob)))
        blobs.append(blob)
        i = j
    head = _dumps(heads)
    return len(head).to_bytes(4, "little") + head + b"".join(blobs)


# ---------------------------------------------------------------- child side

cdef const char* INSERT_BATCH = (
    b"INSERT INTO audit_batches (app_id, first_id, last_id, first_at, last_at, count, channels,"
    b" names, rows) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
cdef const char* INSERT_CHANNEL = b"INSERT INTO audit_batch_channels VALUES (?, ?, ?, ?)"
cdef const char* INSERT_NAME = b"INSERT INTO audit_batch_names VALUES (?, ?, ?, ?)"


cdef int _bind_str(sqlite3_stmt* st, int i, object v) except -1:
    """Binds a str without a copy: the caller keeps it alive until the statement is reset."""
    cdef Py_ssize_t n
    cdef const char* p
    if not PyUnicode_Check(v):
        raise Poison(f"parameter {i}: expected text, got {type(v).__name__}")
    p = PyUnicode_AsUTF8AndSize(v, &n)
    sqlite3_bind_text(st, i, p, <int>n, SQLITE_STATIC)
    return 0


cdef double _number(object v) except? -1:
    if type(v) is not float and type(v) is not int:
        raise Poison("expected a number")
    return PyFloat_AsDouble(v)


cdef class Writer:
    cdef sqlite3* db
    cdef sqlite3_stmt* ins_batch
    cdef sqlite3_stmt* ins_channel
    cdef sqlite3_stmt* ins_name

    def __cinit__(self, str path, tuple pragmas=()):
        """pragmas: sqlite_writer.PRAGMAS, the settings of every audit connection."""
        cdef bytes p = path.encode()
        if sqlite3_open_v2(p, &self.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE
                           | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK:
            self._raise()
        for pragma in pragmas:
            self._exec(pragma.encode())

    def __dealloc__(self):
        self.close()

    def close(self):
        sqlite3_finalize(self.ins_batch)  # NULL is a no-op
        sqlite3_finalize(self.ins_channel)
        sqlite3_finalize(self.ins_name)
        self.ins_batch = self.ins_channel = self.ins_name = NULL
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL

    cdef int _raise(self) except -1:
        cdef int code = sqlite3_errcode(self.db) & 0xFF if self.db != NULL else 0
        msg = (sqlite3_errmsg(self.db) if self.db != NULL else b"out of memory").decode(
            "utf-8", "replace")
        if code in (SQLITE_CONSTRAINT, SQLITE_MISMATCH, SQLITE_TOOBIG, SQLITE_RANGE):
            raise Poison(msg)
        raise Transient(msg)

    cdef int _exec(self, const char* sql) except -1:
        if sqlite3_exec(self.db, sql, NULL, NULL, NULL) != SQLITE_OK:
            self._raise()
        return 0

    cdef int _step(self, sqlite3_stmt* st) except -1:
        cdef int rc = sqlite3_step(st)
        sqlite3_reset(st)
        if rc != SQLITE_DONE:
            self._raise()
        return 0

    def write(self, bytes request):
        """Commits one request in one transaction: one or more of pack's outputs back to back
        (the worker packs a large batch in steps, yielding to its event loop between them).
        Raises Poison (a malformed request) or Transient, and rolls back."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(request), off = 0
        if self.db == NULL:
            raise Transient("the writer is closed")
        if self.ins_name == NULL:  # on first use: the worker creates the tables first
            if (sqlite3_prepare_v2(self.db, INSERT_BATCH, -1, &self.ins_batch, NULL) != SQLITE_OK
                    or sqlite3_prepare_v2(self.db, INSERT_CHANNEL, -1, &self.ins_channel, NULL)
                    != SQLITE_OK
                    or sqlite3_prepare_v2(self.db, INSERT_NAME, -1, &self.ins_name, NULL)
                    != SQLITE_OK):
                self._raise()
        if n < 4:
            raise Poison("a request starts with its head's length")
        self._exec(b"BEGIN IMMEDIATE")
        try:
            while off < n:
                off = self._insert_pack(request, off)
            self._exec(b"COMMIT")
        except BaseException:
            # also after a failed COMMIT (busy: the transaction stays open), or every later
            # BEGIN would fail and the writer could never write again
            sqlite3_exec(self.db, b"ROLLBACK", NULL, NULL, NULL)
            raise

    cdef int _index(self, sqlite3_stmt* st, object app, object last_id, sqlite3_int64 seq,
                    list keys) except -1:
        """The batch's entries in an index table (channels or names): (app, key, last_id, seq)."""
        # reset keeps bindings: the app, the last id and the seq stay bound for every key
        _bind_str(st, 1, app)
        _bind_str(st, 3, last_id)
        sqlite3_bind_int64(st, 4, seq)
        for key in keys:
            _bind_str(st, 2, key)
            self._step(st)
        return 0

    cdef Py_ssize_t _insert_pack(self, bytes request, Py_ssize_t off) except -1:
        """Inserts the batches of the pack at off; returns where it ends."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(request), hlen
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(request)
        cdef const unsigned char* q = p + off
        if n - off < 4:
            raise Poison("a pack starts with its head's length")
        hlen = q[0] | (q[1] << 8) | (q[2] << 16) | (<Py_ssize_t>q[3] << 24)
        if hlen > n - off - 4:
            raise Poison("the head is longer than the request")
        # JSONDecodeError: a ValueError
        heads = _loads(memoryview(request)[off + 4:off + 4 + hlen])
        if type(heads) is not list:
            raise Poison("the head is a list of batches")
        return self._insert(<list>heads, p, off + 4 + hlen, n)

    cdef Py_ssize_t _insert(self, list heads, const unsigned char* p, Py_ssize_t off,
                            Py_ssize_t n) except -1:
        """Inserts the batches whose rows start at off; returns where they end."""
        cdef sqlite3_stmt* b = self.ins_batch
        cdef sqlite3_stmt* ch = self.ins_channel
        cdef sqlite3_stmt* nm = self.ins_name
        cdef Py_ssize_t size
        cdef sqlite3_int64 seq
        cdef bytes channels, names_json
        for h in heads:
            if type(h) is not list or len(<list>h) != 9:
                raise Poison("a batch's head has 9 fields")
            app, first_id, last_id, first_at, last_at, count, chans, names, nbytes = <list>h
            if (type(nbytes) is not int or type(count) is not int or type(chans) is not list
                    or type(names) is not list):
                raise Poison("a batch's head: count and nbytes are integers, channels and "
                             "names lists")
            size = nbytes
            if size <= 0 or off + size > n:
                raise Poison("a batch's rows run past the request")
            channels = _dumps(chans)
            names_json = _dumps(names)
            _bind_str(b, 1, app)
            _bind_str(b, 2, first_id)
            _bind_str(b, 3, last_id)
            sqlite3_bind_double(b, 4, _number(first_at))
            sqlite3_bind_double(b, 5, _number(last_at))
            sqlite3_bind_int64(b, 6, <sqlite3_int64>count)
            sqlite3_bind_text(b, 7, PyBytes_AS_STRING(channels), <int>PyBytes_GET_SIZE(channels),
                              SQLITE_STATIC)
            sqlite3_bind_text(b, 8, PyBytes_AS_STRING(names_json),
                              <int>PyBytes_GET_SIZE(names_json), SQLITE_STATIC)
            sqlite3_bind_blob(b, 9, p + off, <int>size, SQLITE_STATIC)
            self._step(b)
            seq = sqlite3_last_insert_rowid(self.db)
            self._index(ch, app, last_id, seq, <list>chans)
            self._index(nm, app, last_id, seq, <list>names)
            off += size
        return off
