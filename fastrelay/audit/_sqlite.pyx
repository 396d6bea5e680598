# cython: language_level=3
"""The SQLite audit writer's inner loop, on the SQLite C API.

Through the stdlib sqlite3 module each row cost more in Python glue (parameter checks, the
GIL released and taken back around every step, a tuple per row) than in SQLite itself. Here
the two INSERT statements are prepared once and each row's strings are bound straight from
the decoded batch, without copies. Used only by the writer child (sqlite_writer.py); schema,
queries and retention stay on the stdlib module.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AsDouble
from cpython.unicode cimport PyUnicode_Check

import orjson

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3
    ctypedef struct sqlite3_stmt
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
    int sqlite3_bind_double(sqlite3_stmt* st, int i, double v)
    int sqlite3_bind_null(sqlite3_stmt* st, int i)
    int sqlite3_errcode(sqlite3* db)
    const char* sqlite3_errmsg(sqlite3* db)


class Poison(Exception):
    """The rows are invalid (a constraint, a type): retrying never helps; isolate them."""


class Transient(Exception):
    """Locked, busy, I/O error, disk full: worth retrying."""


# one row = id, app_id, channels (list), name, data, socket_id, source, accepted_at, user_id,
# replay_of (base.COLUMNS); data is text (base.AuditLog.record turns objects into JSON)
cdef const char* INSERT_EVENT = (
    b"INSERT OR IGNORE INTO audit_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
cdef const char* INSERT_CHANNEL = b"INSERT OR IGNORE INTO audit_event_channels VALUES (?, ?, ?)"
cdef int NCOLS = 10


cdef int _bind_str(sqlite3_stmt* st, int i, object v, bint null_ok=False) except -1:
    """Binds a str (or None as NULL) without a copy: the caller keeps the row alive until the
    statement is reset."""
    cdef Py_ssize_t n
    cdef const char* p
    if v is None:
        if not null_ok:  # INSERT OR IGNORE would skip the row silently: reject it instead
            raise Poison(f"column {i} is null")
        sqlite3_bind_null(st, i)
        return 0
    if not PyUnicode_Check(v):
        raise Poison(f"column {i}: expected text, got {type(v).__name__}")
    p = PyUnicode_AsUTF8AndSize(v, &n)  # UnicodeEncodeError (a lone surrogate): poison
    sqlite3_bind_text(st, i, p, <int>n, SQLITE_STATIC)
    return 0


cdef class Writer:
    cdef sqlite3* db
    cdef sqlite3_stmt* ins_event
    cdef sqlite3_stmt* ins_channel

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
        sqlite3_finalize(self.ins_event)  # NULL is a no-op
        sqlite3_finalize(self.ins_channel)
        self.ins_event = self.ins_channel = NULL
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

    def write(self, bytes batch):
        """Commits one batch (an orjson array of rows) in one transaction; rows already
        present (same id) are skipped. Raises Poison or Transient, and rolls back."""
        if self.db == NULL:
            raise Transient("the writer is closed")
        if self.ins_channel == NULL:  # on first use: the worker creates the tables first
            if (sqlite3_prepare_v2(self.db, INSERT_EVENT, -1, &self.ins_event, NULL) != SQLITE_OK
                    or sqlite3_prepare_v2(self.db, INSERT_CHANNEL, -1, &self.ins_channel, NULL)
                    != SQLITE_OK):
                self._raise()
        rows = orjson.loads(batch)  # JSONDecodeError (a ValueError): poison, as before
        if type(rows) is not list:
            raise Poison("a batch is a list of rows")
        self._exec(b"BEGIN IMMEDIATE")
        try:
            self._insert(<list>rows)
            self._exec(b"COMMIT")
        except BaseException:
            # also after a failed COMMIT (busy: the transaction stays open), or every later
            # BEGIN would fail and the writer could never write again
            sqlite3_exec(self.db, b"ROLLBACK", NULL, NULL, NULL)
            raise

    cdef int _insert(self, list rows) except -1:
        cdef sqlite3_stmt* ev = self.ins_event
        cdef sqlite3_stmt* ch = self.ins_channel
        cdef bytes channels
        dumps = orjson.dumps
        for r in rows:
            if type(r) is not list or len(<list>r) != NCOLS:
                raise Poison(f"a row has {NCOLS} columns")
            chans = (<list>r)[2]
            if type(chans) is not list:
                raise Poison("channels is a list")
            channels = dumps(chans)
            _bind_str(ev, 1, (<list>r)[0])
            _bind_str(ev, 2, (<list>r)[1])
            _bind_str(ev, 4, (<list>r)[3])
            _bind_str(ev, 5, (<list>r)[4])
            _bind_str(ev, 6, (<list>r)[5], True)
            _bind_str(ev, 7, (<list>r)[6])
            _bind_str(ev, 9, (<list>r)[8], True)
            _bind_str(ev, 10, (<list>r)[9], True)
            sqlite3_bind_text(ev, 3, PyBytes_AS_STRING(channels),
                              <int>PyBytes_GET_SIZE(channels), SQLITE_STATIC)
            t = (<list>r)[7]
            if type(t) is not float and type(t) is not int:
                raise Poison("accepted_at is a number")
            sqlite3_bind_double(ev, 8, PyFloat_AsDouble(t))
            self._step(ev)
            # reset keeps bindings: the row's app and id stay bound for each of its channels
            _bind_str(ch, 1, (<list>r)[1])
            _bind_str(ch, 3, (<list>r)[0])
            for name in <list>chans:
                _bind_str(ch, 2, name)
                self._step(ch)
        return 0
