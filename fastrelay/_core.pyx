# cython: language_level=3
"""The compiled hot path: HTTP/1.1 and WebSocket framing, the per-socket write path,
the channel table's fan-out, signature checks and the connection sweep.

Python code (fastrelay/node.py, protocol.py, http_api.py) decides *what* to do; this module
does the per-byte and per-delivery work. Invariants kept here:
- a delivery allocates no Python object: a channel's frame is encoded once, and each
  subscriber gets a reference to it (or a memcpy into its C buffer when batching);
- writes are coalesced per socket per loop iteration, then sent with one send(2), falling
  back to the transport only when the kernel buffer is full;
- idle connections hold no buffers (input and output buffers exist only while used).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import base64
import hashlib
import logging

import orjson

from fastrelay.errors import HttpError

_log = logging.getLogger("fastrelay.node")

cdef object _dumps = orjson.dumps
cdef object _loads = orjson.loads
cdef object _JSONDecodeError = orjson.JSONDecodeError

cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    int setsockopt(int fd, int level, int name, const void* val, unsigned int vlen)

cdef extern from "netinet/in.h":
    int IPPROTO_TCP

cdef extern from "netinet/tcp.h":
    int TCP_NODELAY

cdef extern from "sys/random.h" nogil:
    ssize_t getrandom(void* buf, size_t n, unsigned int flags)

cdef extern from "stdio.h" nogil:
    int snprintf(char* buf, size_t n, const char* fmt, ...)

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object s)
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* n) except NULL

# OpenSSL's low-level digests: deprecated in 3.0 but exported, and unlike HMAC()/EVP they
# skip the per-call algorithm fetch, provider lookup and locking (~9% of a trigger's CPU).
# The struct bodies are opaque here; C knows their size, so they can live on the stack.
cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)

cdef extern from "openssl/md5.h" nogil:
    ctypedef struct MD5_CTX:
        pass
    int MD5_Init(MD5_CTX* c)
    int MD5_Update(MD5_CTX* c, const void* data, size_t n)
    int MD5_Final(unsigned char* md, MD5_CTX* c)


# ---------------------------------------------------------------- limits and clocks

cdef Py_ssize_t MAX_HEADER = 16384        # request line + headers
cdef Py_ssize_t MAX_BODY = 1048576        # HTTP body
cdef Py_ssize_t MAX_FRAME = 262144        # one WebSocket message (after reassembly)
cdef Py_ssize_t MAX_OUTBOUND = 1048576    # unsent bytes per socket before it is cut off

cdef object _handler = None               # the worker's Node: on_request/on_message/on_close
cdef object _on_request = None            # _handler.on_request, looked up once
cdef object _call_soon = None


def configure(handler, loop, *, max_header=16384, max_body=1048576, max_frame=262144,
              max_outbound=1048576):
    """Binds the core to this worker's Node and event loop and sets its size limits."""
    global _handler, _on_request, _call_soon, MAX_HEADER, MAX_BODY, MAX_FRAME, MAX_OUTBOUND
    _handler = handler
    _on_request = handler.on_request
    _call_soon = loop.call_soon
    MAX_HEADER = max_header
    MAX_BODY = max_body
    MAX_FRAME = max_frame
    MAX_OUTBOUND = max_outbound


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline unsigned int _now_ms() noexcept nogil:
    """Monotonic milliseconds in 32 bits: they wrap every 49 days, and differences taken as
    unsigned stay right across the wrap; 4 bytes per timestamp per connection instead of 8."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <unsigned int>(<uint64_t>ts.tv_sec * 1000 + <uint64_t>ts.tv_nsec // 1000000)


# ---------------------------------------------------------------- the connection table

# Every live connection has a slot in one C array: the sweep walks it, and a socket id names
# its slot ("{random}.{slot}"), so finding a socket by id needs no dict and no id string is
# kept per connection.
cdef PyObject** _slots = NULL
cdef Py_ssize_t _cap = 0
cdef Py_ssize_t _high = 0         # slots below this have been used
cdef Py_ssize_t* _free = NULL     # released slots, reused first
cdef Py_ssize_t _nfree = 0
cdef Py_ssize_t _count = 0
cdef Py_ssize_t _ws_count = 0
# messages being assembled from fragments, by connection: rare, so a table rather than a
# field in every connection (which would push Conn from 144 to 160 bytes)
cdef dict _fragments = {}


cdef int _take_slot(Conn c) except -1:
    global _slots, _cap, _high, _free, _nfree, _count
    cdef Py_ssize_t i
    cdef PyObject** grown
    cdef Py_ssize_t* grown_free
    if _nfree:
        _nfree -= 1
        i = _free[_nfree]
    else:
        if _high == _cap:
            _cap = _cap * 2 if _cap else 4096
            grown = <PyObject**>realloc(_slots, _cap * sizeof(PyObject*))
            grown_free = <Py_ssize_t*>realloc(_free, _cap * sizeof(Py_ssize_t))
            if grown == NULL or grown_free == NULL:
                raise MemoryError()
            _slots = grown
            _free = grown_free
        i = _high
        _high += 1
    Py_INCREF(c)
    _slots[i] = <PyObject*>c
    c.slot = i
    _count += 1
    return 0


cdef void _release_slot(Conn c) noexcept:
    global _nfree, _count
    cdef Py_ssize_t i = c.slot
    if i < 0 or _slots[i] != <PyObject*>c:
        return
    _slots[i] = NULL
    _free[_nfree] = i
    _nfree += 1
    _count -= 1  # c.slot stays: the socket id string stays the same after close
    Py_DECREF(c)


cdef inline uint64_t _random64() noexcept:
    cdef uint64_t r = 0
    if getrandom(&r, sizeof(r), 0) != sizeof(r):
        r = <uint64_t>(_now() * 1e9) ^ <uint64_t><size_t>&r
    return r


def find_socket(str socket_id):
    """The open WebSocket with this socket id, or None (an unknown or stale id)."""
    cdef Py_ssize_t i
    dot = socket_id.find(".")
    if dot <= 0 or dot > 20 or len(socket_id) - dot > 20:
        return None
    try:
        rnd = int(socket_id[:dot])
        i = int(socket_id[dot + 1:])
    except ValueError:
        return None
    if i < 0 or i >= _high or _slots[i] == NULL:
        return None
    cdef Conn c = <Conn>_slots[i]
    if c.sid == 0 or c.sid != rnd or (c.state != S_WS and c.state != S_CLOSING):
        return None
    return c


# ---------------------------------------------------------------- event ids

cdef char _id_node[11]            # 40 random bits as 10 hex digits, per process
cdef long long _id_last_ms = 0
cdef long long _id_seq = 0


def reseed_event_ids():
    """Draws this process's 40 random bits again (after fork: workers must never collide)."""
    snprintf(_id_node, 11, "%010llx", <unsigned long long>(_random64() & 0xffffffffff))


reseed_event_ids()


cdef str _event_id(timespec* ts):
    """A time-ordered unique id: 12 hex digits of ms time, 5 of sequence, 10 random per process.

    Fixed-width hex, so sorting ids as strings sorts them by acceptance time (the audit pages
    by id). Called on the event loop's thread only.
    """
    global _id_last_ms, _id_seq
    cdef char buf[32]
    cdef long long ms = ts.tv_sec * 1000 + ts.tv_nsec // 1000000
    if ms <= _id_last_ms:
        ms = _id_last_ms
        _id_seq += 1
        if _id_seq >= (1 << 20):  # more than a million ids in one ms: borrow the next ms
            ms += 1
            _id_seq = 0
    else:
        _id_seq = 0
    _id_last_ms = ms
    # by hand: snprintf's "%012llx%05llx%s" ran ~1,200 instructions on every event
    _hex(buf, <unsigned long long>ms, 12)
    _hex(buf + 12, <unsigned long long>_id_seq, 5)
    memcpy(buf + 17, _id_node, 10)
    return PyUnicode_DecodeLatin1(buf, 27, NULL)


cdef const char* _HEXDIGITS = b"0123456789abcdef"


cdef inline void _hex(char* out, unsigned long long v, int width) noexcept:
    """v as `width` lowercase hex digits, zero-padded (the low digits when v is wider)."""
    cdef int i
    for i in range(width - 1, -1, -1):
        out[i] = _HEXDIGITS[v & 15]
        v >>= 4


cpdef str new_event_id():
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return _event_id(&ts)


def event_id_floor(double t):
    """A string no greater than the id of any event accepted at time t or later: an id's time
    is its accepted_at, moved only forward (ids never repeat), so an audit query `since` t
    can start its walk of the id index here. One ms less, for accepted_at's float rounding."""
    cdef char buf[12]
    cdef long long ms = <long long>(t * 1000) - 1
    _hex(buf, <unsigned long long>(ms if ms > 0 else 0), 12)
    return PyUnicode_DecodeLatin1(buf, 12, NULL)


cdef class Event:
    """One accepted event, fanned out to each of its channels: what intake produces, the
    audit stores and the bus carries.

    `data` is the value carried in the Pusher frame's "data" field: a string for server events
    (the HTTP API sends JSON as a string), any JSON value for client events (relayed as sent).
    `source`: api | intake | client | replay. `user_id`: the sender of a client event on a
    presence channel. A new event's id and accepted_at come from one clock reading.
    A compiled class: one is made per accepted event, on the trigger's hot path.
    """

    def __init__(self, app_id, channels, name, data, socket_id=None, source="api", id=None,
                 accepted_at=None, user_id=None):
        cdef timespec ts
        self.app_id = app_id
        self.channels = channels
        self.name = name
        self.data = data
        self.socket_id = socket_id
        self.source = source
        self.user_id = user_id
        if id is None or accepted_at is None:
            clock_gettime(CLOCK_REALTIME, &ts)
            self.id = _event_id(&ts) if id is None else id
            self.accepted_at = (ts.tv_sec + ts.tv_nsec * 1e-9 if accepted_at is None
                                else accepted_at)
        else:
            self.id = id
            self.accepted_at = accepted_at

    def __repr__(self):
        return (f"Event(id={self.id!r}, app_id={self.app_id!r}, channels={self.channels!r}, "
                f"name={self.name!r}, source={self.source!r})")

    cpdef tuple audit_row(self, replay_of=None):
        """The audit's row (audit/base.py COLUMNS), built in C: reading nine attributes from
        Python goes through a descriptor each, on every audited event."""
        return (self.id, self.app_id, tuple(self.channels), self.name, self.data,
                self.socket_id, self.source, self.accepted_at, self.user_id, replay_of)


def connection_count():
    return _count


def websocket_count():
    return _ws_count


def connections():
    """A snapshot list of live connections (shutdown, admin); not for the hot path."""
    cdef Py_ssize_t i
    return [<Conn>_slots[i] for i in range(_high) if _slots[i] != NULL]


# ---------------------------------------------------------------- the write path

cdef PyObject** _dirty = NULL     # connections with queued output this iteration
cdef Py_ssize_t _ndirty = 0
cdef Py_ssize_t _dirty_cap = 0
cdef bint _flush_scheduled = False


cdef int _mark_dirty(Conn c) except -1:
    global _dirty, _ndirty, _dirty_cap, _flush_scheduled
    cdef PyObject** grown
    if _ndirty == _dirty_cap:
        _dirty_cap = _dirty_cap * 2 if _dirty_cap else 1024
        grown = <PyObject**>realloc(_dirty, _dirty_cap * sizeof(PyObject*))
        if grown == NULL:
            raise MemoryError()
        _dirty = grown
    Py_INCREF(c)
    _dirty[_ndirty] = <PyObject*>c
    _ndirty += 1
    c.queued = True
    if not _flush_scheduled:
        _flush_scheduled = True
        _call_soon(flush_all)
    return 0


def flush_all():
    """Sends what each socket was given this loop iteration, one send(2) per socket."""
    global _ndirty, _flush_scheduled
    cdef Py_ssize_t i = 0
    cdef Conn c
    _flush_scheduled = False
    # flushing may queue more (a close frame): walk until the list stays empty
    while i < _ndirty:
        c = <Conn>_dirty[i]
        c.queued = False
        try:
            c._flush()
        except Exception:
            pass  # a dead socket; connection_lost cleans up
        Py_DECREF(c)
        _dirty[i] = NULL
        i += 1
    _ndirty = 0


cdef int _raw_send(Conn c, const char* data, Py_ssize_t n) except -1:
    """Writes directly to the socket when the transport holds nothing; hands it the rest."""
    cdef ssize_t rc = 0
    if c.state == S_CLOSED or n == 0:
        return 0
    if c.fd >= 0 and not c.blocked:
        while True:
            rc = send(c.fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT)
            if rc < 0 and errno == EINTR:
                continue
            break
        if rc == n:
            return 0
        if rc < 0:
            if errno != EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
                c.transport.abort()
                return 0
            rc = 0
    # the kernel buffer is full (or this is TLS): the transport queues and drains it
    c.transport.write(PyBytes_FromStringAndSize(data + rc, n - rc))
    # once: close() leaves S_WS before it flushes its close frame, which goes through the
    # transport behind the backlog (sent straight to the socket it would cut a frame)
    if c.blocked and c.state == S_WS and c.transport.get_write_buffer_size() > MAX_OUTBOUND:
        _slow_consumer(c)
    return 0


cdef void _slow_consumer(Conn c) noexcept:
    try:
        _handler.on_slow_consumer(c)
    except Exception:
        pass


# ---------------------------------------------------------------- WebSocket encoding

cdef inline Py_ssize_t _hdr_len(Py_ssize_t n) noexcept nogil:
    if n < 126:
        return 2
    if n < 65536:
        return 4
    return 10


cdef inline void _put_hdr(unsigned char* p, int opcode, Py_ssize_t n) noexcept nogil:
    cdef int k
    p[0] = 0x80 | opcode
    if n < 126:
        p[1] = <unsigned char>n
    elif n < 65536:
        p[1] = 126
        p[2] = (n >> 8) & 0xFF
        p[3] = n & 0xFF
    else:
        p[1] = 127
        for k in range(8):
            p[2 + k] = (<uint64_t>n >> (56 - 8 * k)) & 0xFF


cpdef bytes encode_frame(object payload, int opcode=1):
    """One unmasked server frame (text by default) around payload (bytes or str)."""
    cdef bytes data = payload.encode() if isinstance(payload, str) else payload
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t h = _hdr_len(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    _put_hdr(p, opcode, n)
    memcpy(p + h, PyBytes_AS_STRING(data), n)
    return out


cpdef bytes encode_close(int code, str reason=""):
    # at most 123 bytes, cut on a character boundary: a close reason must be valid UTF-8
    cdef bytes r = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return encode_frame(bytes([(code >> 8) & 0xFF, code & 0xFF]) + r, 8)


cdef bytes _PING = encode_frame(b'{"event":"pusher:ping","data":"{}"}')


# ---------------------------------------------------------------- HTTP answers

cdef dict _REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 202: "Accepted",
    204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    409: "Conflict", 411: "Length Required", 413: "Payload Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content",
    426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
}

cdef dict _STATUS_LINES = {}


cdef bytes _status_line(int status):
    """b"HTTP/1.1 200 OK\\r\\nContent-Type: " (cached per status)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\nContent-Type: " % (
            status, _REASONS.get(status, "Unknown").encode())
        _STATUS_LINES[status] = line
    return line


cdef bytes _WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ---------------------------------------------------------------- the protocol

cdef class Request:
    """One parsed HTTP/1.1 request. `path` and `query` are raw (signatures cover them as sent)."""

    def __repr__(self):
        return f"<Request {self.method} {self.path}>"


cdef class Conn:
    """An asyncio protocol for one TCP connection: HTTP first, then maybe a WebSocket."""

    def __cinit__(self):
        self.slot = -1
        self.fd = -1
        self.state = S_HTTP
        self.obuf = NULL

    def __dealloc__(self):
        if self.obuf != NULL:
            free(self.obuf)
            self.obuf = NULL

    # ---- asyncio protocol callbacks

    def connection_made(self, transport):
        cdef int one = 1
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if transport.get_extra_info("sslcontext") is None and sock is not None:
            self.fd = sock.fileno()
            setsockopt(self.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        # pause_writing/resume_writing then say exactly whether the transport holds bytes
        transport.set_write_buffer_limits(high=0)
        self.last_seen = self.since = _now_ms()
        _take_slot(self)

    def connection_lost(self, exc):
        global _ws_count
        was_ws = self.state == S_WS or self.state == S_CLOSING
        if was_ws:
            _ws_count -= 1
        self.state = S_CLOSED
        self.fd = -1
        self.pend = None
        self.inbuf = None
        if _fragments:
            _fragments.pop(self, None)
        self.olen = 0
        if self.obuf != NULL:
            free(self.obuf)
            self.obuf = NULL
            self.ocap = 0
        try:
            if was_ws:
                _handler.on_close(self)
        finally:
            self.transport = None
            _release_slot(self)

    def pause_writing(self):
        self.blocked = True

    def resume_writing(self):
        self.blocked = False

    def eof_received(self):
        return False  # close our side too

    def data_received(self, bytes data):
        cdef Py_ssize_t n, used
        self.last_seen = _now_ms()
        self.ping_sent = False
        if self.state == S_WS and self.inbuf is None:
            # the common case: whole frames in one read, parsed straight from the bytes
            n = PyBytes_GET_SIZE(data)
            used = self._parse_ws(<const unsigned char*>PyBytes_AS_STRING(data), n)
            if used < n and self.state == S_WS:
                self.inbuf = bytearray(data[used:])
            return
        if self.state == S_CLOSED or self.state == S_DRAIN:
            return
        if self.state == S_HTTP and self.inbuf is None and not self.held:
            # the common API case: exactly one whole request in this read, parsed straight
            # from the bytes (no input buffer, one copy of the body)
            if self._http_whole(data):
                return
        if self.inbuf is None:
            self.inbuf = bytearray(data)
        else:
            self.inbuf += data
        self._process()

    cdef int _process_ws_buffer(self) except -1:
        cdef bytearray buf = self.inbuf
        cdef Py_ssize_t used = self._parse_ws(
            <const unsigned char*>PyByteArray_AS_STRING(buf), PyByteArray_GET_SIZE(buf))
        if self.state != S_WS:
            self.inbuf = None
        elif used == PyByteArray_GET_SIZE(buf):
            self.inbuf = None
        elif used:
            del buf[:used]
        return 0

    def _process(self):
        if self.state == S_HTTP:
            self._parse_http()
        if (self.state == S_WS or self.state == S_CLOSING) and self.inbuf is not None:
            self._process_ws_buffer()

    # ---- HTTP/1.1

    cdef int _parse_http(self) except -1:
        cdef bytearray buf
        cdef const char* p
        cdef const char* why
        cdef Py_ssize_t n, hlen, clen, total
        cdef int status
        cdef Request req
        while self.state == S_HTTP and not self.held and self.inbuf is not None:
            buf = self.inbuf
            n = PyByteArray_GET_SIZE(buf)
            if n == 0:
                self.inbuf = None
                self.req_started = False
                return 0
            if not self.req_started:
                self.req_started = True
                self.since = _now_ms()
            p = PyByteArray_AS_STRING(buf)
            req = _head(p, n, &hlen, &clen, &status, &why)
            if req is None:
                if status:
                    self._http_error(status, why.decode())
                return 0
            total = hlen + clen
            if n < total:
                if clen and n == hlen and req.headers.get("expect", "").lower() == "100-continue":
                    self._send_now(b"HTTP/1.1 100 Continue\r\n\r\n")
                return 0
            req.body = bytes(buf[hlen:total]) if clen else b""
            del buf[:total]
            self.req_started = False
            if PyByteArray_GET_SIZE(buf) == 0:
                self.inbuf = None
            _on_request(self, req)
        return 0

    cdef bint _http_whole(self, bytes data) except -1:
        """Handles data when it is exactly one complete, well-formed request; False (nothing
        done) otherwise, and the general buffered path takes it, checks and errors included."""
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef const char* why
        cdef Py_ssize_t hlen, clen
        cdef int status
        cdef Request req = _head(p, PyBytes_GET_SIZE(data), &hlen, &clen, &status, &why)
        if req is None or hlen + clen != PyBytes_GET_SIZE(data):
            return False
        req.body = PyBytes_FromStringAndSize(p + hlen, clen) if clen else b""
        self.since = self.last_seen
        self.req_started = False
        _on_request(self, req)
        return True

    cdef int _http_error(self, int status, str message) except -1:
        self.respond(status, b'{"error":"' + message.encode() + b'"}', keep_alive=False)
        return 0

    cpdef respond(self, int status, bytes body, bytes content_type=b"application/json",
                  object headers=None, bint keep_alive=True):
        """Sends one HTTP answer at once (answers go out before the fan-out they trigger)."""
        if self.state != S_HTTP:
            return
        self.status = status
        if not headers and keep_alive:
            self._send_simple(_status_line(status), content_type, body)
        else:
            parts = [_status_line(status), content_type,
                     b"\r\nContent-Length: %d\r\n" % len(body)]
            if headers:
                for k, v in headers:
                    parts.append(f"{k}: {v}\r\n".encode())
            if not keep_alive:
                parts.append(b"Connection: close\r\n")
            parts.append(b"\r\n")
            parts.append(body)
            self._send_now(b"".join(parts))
        if not keep_alive:
            # half-close and let the peer close: closing with unread input would send an
            # RST that can destroy the answer before the client reads it
            self.state = S_DRAIN
            self.since = _now_ms()
            self.inbuf = None
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
            return
        if self.held:
            self.held = False
            self.transport.resume_reading()
            if self.inbuf is not None:
                _call_soon(self._process)

    def hold(self):
        """The answer will come later (an async handler): stop reading until respond()."""
        self.held = True
        self.transport.pause_reading()

    def accept_websocket(self, Request req):
        """Answers the upgrade with 101; from here on the connection speaks WebSocket."""
        global _ws_count
        key = req.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())
        self._send_now(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.state = S_WS
        self.status = 101
        _ws_count += 1
        self.sid = _random64() >> 24 or 1  # 40 random bits: unguessable, and short
        self.since = self.last_seen = _now_ms()
        if self.inbuf is not None:
            _call_soon(self._process)

    # ---- WebSocket input

    cdef Py_ssize_t _parse_ws(self, const unsigned char* buf, Py_ssize_t n) except -1:
        cdef Py_ssize_t pos = 0, hdr, plen, i, m
        cdef unsigned char b0, b1
        cdef int op
        cdef bint fin
        cdef const unsigned char* mask
        cdef unsigned char* out
        cdef uint64_t mask64
        cdef bytes payload
        while n - pos >= 2 and (self.state == S_WS or self.state == S_CLOSING):
            b0 = buf[pos]
            b1 = buf[pos + 1]
            fin = (b0 & 0x80) != 0
            op = b0 & 0x0F
            if b0 & 0x70:
                self._fail(1002, "reserved bits set")
                return n
            if not (b1 & 0x80):
                self._fail(1002, "client frames must be masked")
                return n
            plen = b1 & 0x7F
            hdr = 2
            if plen == 126:
                if n - pos < 4:
                    break
                plen = (buf[pos + 2] << 8) | buf[pos + 3]
                hdr = 4
            elif plen == 127:
                if n - pos < 10:
                    break
                plen = 0
                for i in range(8):
                    if i == 0 and buf[pos + 2] & 0x80:
                        plen = -1
                        break
                    plen = (plen << 8) | buf[pos + 2 + i]
                hdr = 10
            if plen < 0 or plen > MAX_FRAME:
                self._fail(1009, "frame exceeds the size limit")
                return n
            if n - pos < hdr + 4 + plen:
                break
            mask = buf + pos + hdr
            payload = PyBytes_FromStringAndSize(NULL, plen)
            out = <unsigned char*>PyBytes_AS_STRING(payload)
            memcpy(out, buf + pos + hdr + 4, plen)
            memcpy(&mask64, mask, 4)
            memcpy((<unsigned char*>&mask64) + 4, mask, 4)
            m = plen & ~7
            i = 0
            while i < m:
                (<uint64_t*>(out + i))[0] ^= mask64
                i += 8
            while i < plen:
                out[i] ^= mask[i & 3]
                i += 1
            pos += hdr + 4 + plen
            if op >= 8:
                if op > 10:
                    self._fail(1002, "unknown opcode")
                    return n
                if not fin or plen > 125:
                    self._fail(1002, "invalid control frame")
                    return n
                self._control(op, payload)
                continue
            if self.state != S_WS:
                continue  # data after our close frame is dropped
            if op == 0:
                frag = _fragments.get(self) if _fragments else None
                if frag is None:
                    self._fail(1002, "continuation without a message")
                    return n
                if PyByteArray_GET_SIZE(frag) + plen > MAX_FRAME:
                    self._fail(1009, "message exceeds the size limit")
                    return n
                frag += payload
                if fin:
                    del _fragments[self]
                    _handler.on_message(self, bytes(frag))
            elif op == 1:
                if _fragments and self in _fragments:
                    self._fail(1002, "new message inside a fragmented one")
                    return n
                if fin:
                    _handler.on_message(self, payload)
                else:
                    _fragments[self] = bytearray(payload)
            elif op == 2:
                self._fail(1003, "binary frames are not part of the Pusher protocol")
                return n
            else:
                self._fail(1002, "unknown opcode")
                return n
        return pos

    cdef int _control(self, int opcode, bytes payload) except -1:
        cdef int code = 1000
        if opcode == 9:
            if self.state == S_WS:
                self._queue(encode_frame(payload, 10))
        elif opcode == 8:
            if self.state == S_CLOSING:
                self._flush()
                self.transport.close()
                return 0
            if PyBytes_GET_SIZE(payload) >= 2:
                code = (<unsigned char>payload[0] << 8) | <unsigned char>payload[1]
            elif PyBytes_GET_SIZE(payload) == 1:
                code = 1002
            if code < 1000 or code in (1004, 1005, 1006) or 1016 <= code < 3000 or code > 4999:
                code = 1002
            self._queue(encode_close(code))
            self._flush()
            self.state = S_CLOSING
            self.transport.close()
        # pongs only count as activity, which data_received already noted
        return 0

    cdef int _fail(self, int code, str reason) except -1:
        self.close(code, reason)
        return 0

    # ---- output

    cdef int _queue(self, bytes frame) except -1:
        cdef Py_ssize_t n, need, cap
        cdef char* grown
        cdef bytes first
        if self.pend is None and self.olen == 0:
            self.pend = frame   # a reference, no copy: the common single-frame case
        else:
            n = PyBytes_GET_SIZE(frame)
            if self.pend is not None:
                first = self.pend
                self.pend = None
                need = PyBytes_GET_SIZE(first) + n
            else:
                need = self.olen + n
            if need > 0xFFFFFFFF:
                raise MemoryError("outbound buffer over 4 GB")
            if need > self.ocap:
                cap = self.ocap * 2 if self.ocap else 4096
                while cap < need:
                    cap *= 2
                grown = <char*>realloc(self.obuf, cap)
                if grown == NULL:
                    raise MemoryError()
                self.obuf = grown
                self.ocap = cap
            if self.olen == 0 and first is not None:
                memcpy(self.obuf, PyBytes_AS_STRING(first), PyBytes_GET_SIZE(first))
                self.olen = PyBytes_GET_SIZE(first)
            memcpy(self.obuf + self.olen, PyBytes_AS_STRING(frame), n)
            self.olen += n
        if not self.queued:
            _mark_dirty(self)
        return 0

    cdef int _flush(self) except -1:
        cdef bytes one
        if self.pend is not None:
            one = self.pend
            self.pend = None
            _raw_send(self, PyBytes_AS_STRING(one), PyBytes_GET_SIZE(one))
        elif self.olen:
            n = self.olen
            self.olen = 0
            _raw_send(self, self.obuf, n)
            if self.ocap > 65536:  # don't let one burst pin a large buffer
                free(self.obuf)
                self.obuf = NULL
                self.ocap = 0
        return 0

    cdef int _send_simple(self, bytes line, bytes content_type, bytes body) except -1:
        """The common answer (no extra headers, keep-alive), assembled in C: through bytes
        formatting it ran ~2,000 instructions on every trigger's answer."""
        cdef char buf[1024]
        cdef char digits[24]
        cdef Py_ssize_t nl = PyBytes_GET_SIZE(line), nc = PyBytes_GET_SIZE(content_type)
        cdef Py_ssize_t nb = PyBytes_GET_SIZE(body), nd = 0, v = nb, n = 0
        while True:  # Content-Length, digits in reverse
            digits[nd] = <char>(48 + v % 10)
            nd += 1
            v //= 10
            if v == 0:
                break
        if nl + nc + nd + nb + 22 > <Py_ssize_t>sizeof(buf):
            return self._send_now(b"%s%s\r\nContent-Length: %d\r\n\r\n%s" % (
                line, content_type, nb, body))
        memcpy(buf, PyBytes_AS_STRING(line), nl)
        n = nl
        memcpy(buf + n, PyBytes_AS_STRING(content_type), nc)
        n += nc
        memcpy(buf + n, b"\r\nContent-Length: ", 18)
        n += 18
        while nd:
            nd -= 1
            buf[n] = digits[nd]
            n += 1
        memcpy(buf + n, b"\r\n\r\n", 4)
        n += 4
        memcpy(buf + n, PyBytes_AS_STRING(body), nb)
        return self._send_buf(buf, n + nb)

    cdef int _send_now(self, bytes data) except -1:
        return self._send_buf(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef int _send_buf(self, const char* data, Py_ssize_t n) except -1:
        """At once, behind whatever this connection has queued."""
        if self.pend is not None or self.olen:
            self._flush()
        _raw_send(self, data, n)
        return 0

    def send(self, bytes frame):
        """Queues an encoded frame; it leaves with this iteration's flush."""
        if self.state == S_WS:
            self._queue(frame)

    def close(self, int code=1000, str reason=""):
        """Starts the closing handshake; the socket goes when the peer answers or times out."""
        if self.state == S_WS:
            self.state = S_CLOSING
            self._queue(encode_close(code, reason))
            self._flush()
            self.since = _now_ms()
            if _fragments:
                _fragments.pop(self, None)
            try:
                if self.transport.can_write_eof():
                    self.transport.write_eof()
            except Exception:
                self.transport.close()
        elif self.state == S_HTTP:
            self.state = S_CLOSING
            self.transport.close()

    def abort(self):
        if self.transport is not None:
            self.transport.abort()

    @property
    def socket_id(self):
        """"{random}.{slot}": unguessable (private channel signatures are bound to it) and
        resolvable without a dict (find_socket)."""
        return f"{self.sid}.{self.slot}"

    @property
    def is_websocket(self):
        return self.state == S_WS


cdef inline const char* _find(const char* p, Py_ssize_t n, const char* needle,
                              Py_ssize_t m) noexcept:
    """The first needle (starting with "\r") in the n bytes at p, or NULL. glibc's memmem
    sets up a two-way search on every call: ~3,500 instructions of each request's head."""
    cdef const char* end = p + n
    cdef const char* q = p
    while end - q >= m:
        q = <const char*>memchr(q, 13, end - q - m + 1)
        if q == NULL:
            return NULL
        if memcmp(q, needle, m) == 0:
            return q
        q += 1
    return NULL


cdef Request _head(const char* p, Py_ssize_t n, Py_ssize_t* hlen, Py_ssize_t* clen,
                   int* status, const char** why):
    """The checked head of the request at p (n bytes buffered): the Request, with the head's
    and body's lengths; or None, with *status 0 (incomplete) or the HTTP status to refuse it."""
    cdef const char* hend = _find(p, n, b"\r\n\r\n", 4)
    cdef Request req
    status[0] = 0
    if hend == NULL:
        if n > MAX_HEADER:
            status[0], why[0] = 431, "request line and headers exceed the limit"
        return None
    hlen[0] = hend - p + 4
    if hlen[0] > MAX_HEADER:
        status[0], why[0] = 431, "request line and headers exceed the limit"
        return None
    req = _parse_head(p, hlen[0])
    if req is None:
        status[0], why[0] = 400, "malformed HTTP request"
        return None
    if "transfer-encoding" in req.headers:
        status[0], why[0] = 411, "chunked bodies are not supported; send Content-Length"
        return None
    clen[0] = 0
    cl = req.headers.get("content-length")
    if cl is not None:
        clen[0] = _content_length(cl)
        if clen[0] < 0:
            status[0], why[0] = 400, "invalid Content-Length"
            return None
    if clen[0] > MAX_BODY:
        status[0], why[0] = 413, "request body exceeds the limit"
        return None
    return req


cdef Request _parse_head(const char* p, Py_ssize_t hlen):
    """Request line and headers; None when malformed. Header names are lower-cased."""
    cdef const char* end = p + hlen - 2   # the final CRLF
    cdef const char* line_end
    cdef const char* sp1
    cdef const char* sp2
    cdef const char* colon
    cdef const char* vs
    cdef const char* ve
    cdef const char* q
    cdef Request req = Request.__new__(Request)
    cdef dict headers = {}
    cdef int count = 0
    cdef char lname[256 + 1]
    cdef Py_ssize_t nlen, k
    cdef unsigned char ch
    line_end = _find(p, end - p, b"\r\n", 2)
    if line_end == NULL:
        return None
    sp1 = <const char*>memchr(p, 32, line_end - p)
    if sp1 == NULL or sp1 == p:
        return None
    sp2 = <const char*>memchr(sp1 + 1, 32, line_end - sp1 - 1)
    if sp2 == NULL or sp2 == sp1 + 1 or line_end - sp2 - 1 != 8:
        return None
    if memcmp_(sp2 + 1, b"HTTP/1.", 7) != 0:
        return None
    req.method = PyUnicode_DecodeLatin1(p, sp1 - p, NULL)
    q = <const char*>memchr(sp1 + 1, 63, sp2 - sp1 - 1)  # '?'
    if q == NULL:
        req.path = PyUnicode_DecodeLatin1(sp1 + 1, sp2 - sp1 - 1, NULL)
        req.query = ""
    else:
        req.path = PyUnicode_DecodeLatin1(sp1 + 1, q - sp1 - 1, NULL)
        req.query = PyUnicode_DecodeLatin1(q + 1, sp2 - q - 1, NULL)
    minor = sp2[8]
    p = line_end + 2
    while p < end:
        line_end = _find(p, end - p + 2, b"\r\n", 2)
        if line_end == NULL:
            return None
        colon = <const char*>memchr(p, 58, line_end - p)
        if colon == NULL or colon == p:
            return None
        vs = colon + 1
        while vs < line_end and (vs[0] == 32 or vs[0] == 9):
            vs += 1
        ve = line_end
        while ve > vs and ((ve - 1)[0] == 32 or (ve - 1)[0] == 9):
            ve -= 1
        nlen = colon - p
        if nlen <= 256:
            for k in range(nlen):
                ch = <unsigned char>p[k]
                if ch == 32 or ch == 9:
                    return None
                lname[k] = ch + 32 if 65 <= ch <= 90 else ch
            name = PyUnicode_DecodeLatin1(lname, nlen, NULL)
        else:  # a long name: rare, the general way
            name = p[:nlen].decode("latin-1").lower()
            if " " in name or "\t" in name:
                return None
        value = PyUnicode_DecodeLatin1(vs, ve - vs, NULL)
        if name in headers:
            headers[name] = headers[name] + ", " + value
        else:
            headers[name] = value
        count += 1
        if count > 100:
            return None
        p = line_end + 2
    req.headers = headers
    conn_hdr = headers.get("connection", "").lower()
    if minor == 49:  # HTTP/1.1
        req.keep_alive = "close" not in conn_hdr
    else:
        req.keep_alive = "keep-alive" in conn_hdr
    return req


cdef Py_ssize_t _content_length(str value):
    """1 to 12 ASCII digits -> their value; -1 for anything else (str.isdigit() also
    accepts non-ASCII digits such as '\u00b2', which int() then refuses)."""
    cdef Py_ssize_t i, n = len(value), v = 0
    cdef long d
    if n == 0 or n > 12:
        return -1
    for i in range(n):
        d = <long>(<Py_UCS4>value[i]) - 48
        if d < 0 or d > 9:
            return -1
        v = v * 10 + d
    return v


cdef inline int memcmp_(const char* a, const char* b, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] != b[i]:
            return 1
    return 0


# ---------------------------------------------------------------- channels and fan-out

cdef class Channel:
    """One app's channel on this worker: its local subscribers and what the kind needs."""

    def __init__(self, app_id, str name, int kind):
        self.app_id = app_id
        self.name = name
        self.kind = kind
        self.members = {}
        self.roster = {} if name.startswith("presence-") else None

    cpdef int fanout(self, bytes frame, Conn exclude=None) except -1:
        """Queues the same frame bytes on every local subscriber; returns the count."""
        cdef Py_ssize_t pos = 0
        cdef PyObject* key
        cdef PyObject* value
        cdef Conn c
        cdef int sent = 0
        while PyDict_Next(self.members, &pos, &key, &value):
            c = <Conn>key
            if c is exclude or c.state != S_WS:
                continue
            c._queue(frame)
            sent += 1
        return sent

    def __len__(self):
        return len(self.members)

    def __repr__(self):
        return f"<Channel {self.app_id}/{self.name} {len(self.members)} local>"


# ---------------------------------------------------------------- the sweep

def sweep(double activity_timeout, double pong_timeout, double request_timeout,
          double idle_timeout, double closing_timeout):
    """Pings silent sockets, closes dead ones (4201), slow requests (408) and idle ones.

    One pass over the connection table replaces a timer per connection.
    """
    cdef unsigned int now = _now_ms()
    cdef unsigned int pong_ms = <unsigned int>(pong_timeout * 1000)
    cdef unsigned int activity_ms = <unsigned int>(activity_timeout * 1000)
    cdef unsigned int request_ms = <unsigned int>(request_timeout * 1000)
    cdef unsigned int idle_ms = <unsigned int>(idle_timeout * 1000)
    cdef unsigned int closing_ms = <unsigned int>(closing_timeout * 1000)
    cdef Conn c
    cdef Py_ssize_t i
    for i in range(_high):
        if _slots[i] == NULL:
            continue
        c = <Conn>_slots[i]  # a reference: closing below may release the slot
        if c.state == S_WS:
            if c.ping_sent:
                if <unsigned int>(now - c.since) > pong_ms:
                    c.close(4201, "Pong reply not received")
                    _handler.on_swept(c, 4201)
            elif <unsigned int>(now - c.last_seen) > activity_ms:
                c.ping_sent = True
                c.since = now
                c._queue(_PING)
        elif c.state == S_HTTP:
            if c.req_started and <unsigned int>(now - c.since) > request_ms:
                c._http_error(408, "request not completed in time")
                _handler.on_swept(c, 408)
            elif not c.held and <unsigned int>(now - c.last_seen) > idle_ms:
                c.close()
        elif (c.state == S_CLOSING or c.state == S_DRAIN) and <unsigned int>(now - c.since) > closing_ms:
            c.transport.abort()


# ---------------------------------------------------------------- signatures

# HMAC-SHA256 (RFC 2104) = H((K ^ opad) || H((K ^ ipad) || m)). The two padded-key blocks
# depend only on the key, so each key's SHA-256 state after absorbing them is kept; a call
# then costs copying two contexts plus the message's own blocks and two final blocks.
# App secrets are few: the cache is simply emptied if something feeds it many keys.
cdef dict _hmac_states = {}   # key bytes -> bytes holding SHA256_CTX[2]: (inner, outer)
cdef Py_ssize_t HMAC_STATES_MAX = 1024


cdef bytes _hmac_state(bytes key):
    state = _hmac_states.get(key)
    if state is not None:
        return <bytes>state
    cdef unsigned char k[64]
    cdef unsigned char pad[64]
    cdef SHA256_CTX ctx[2]
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(key)
    memset(k, 0, 64)
    if n > 64:  # RFC 2104: a key longer than the block is replaced by its hash
        SHA256_Init(&ctx[0])
        SHA256_Update(&ctx[0], PyBytes_AS_STRING(key), n)
        SHA256_Final(k, &ctx[0])
    else:
        memcpy(k, PyBytes_AS_STRING(key), n)
    for i in range(64):
        pad[i] = k[i] ^ 0x36
    SHA256_Init(&ctx[0])
    SHA256_Update(&ctx[0], pad, 64)
    for i in range(64):
        pad[i] = k[i] ^ 0x5c
    SHA256_Init(&ctx[1])
    SHA256_Update(&ctx[1], pad, 64)
    # Copied out as bytes (not used in place), so the buffer's alignment never matters.
    state = PyBytes_FromStringAndSize(<char*>ctx, 2 * sizeof(SHA256_CTX))
    if len(_hmac_states) >= HMAC_STATES_MAX:
        _hmac_states.clear()
    _hmac_states[key] = state
    return <bytes>state


cdef int _hmac_sha256(bytes key, bytes message, unsigned char* out) except -1:
    """The 32-byte HMAC-SHA256(key, message) into out."""
    if key is None or message is None:
        raise TypeError("key and message must be bytes")
    _hmac_sha256_buf(key, PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message), out)
    return 0


cdef void _hmac_sha256_buf(bytes key, const char* msg, Py_ssize_t n, unsigned char* out) except *:
    cdef const char* st = PyBytes_AS_STRING(_hmac_state(key))
    cdef SHA256_CTX ctx
    memcpy(&ctx, st, sizeof(SHA256_CTX))
    SHA256_Update(&ctx, msg, n)
    SHA256_Final(out, &ctx)
    memcpy(&ctx, st + sizeof(SHA256_CTX), sizeof(SHA256_CTX))
    SHA256_Update(&ctx, out, 32)
    SHA256_Final(out, &ctx)


cdef inline void _to_hex(const unsigned char* d, Py_ssize_t n, char* out) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        out[2 * i] = _HEXDIGITS[d[i] >> 4]
        out[2 * i + 1] = _HEXDIGITS[d[i] & 15]


cdef int _hex_matches(const unsigned char* d, Py_ssize_t n, object given) except -1:
    """True when given (str or bytes, hex in any case) spells digest d. Same answers as the
    former `given.lower().encode("ascii") == hexdigest` (non-ASCII or other types: False),
    without allocating."""
    cdef const char* g
    cdef Py_ssize_t glen
    if isinstance(given, str):
        if not PyUnicode_IS_ASCII(given):
            return False
        g = PyUnicode_AsUTF8AndSize(given, &glen)  # an ASCII str's own buffer: no copy
    elif isinstance(given, bytes):
        g = PyBytes_AS_STRING(given)
        glen = PyBytes_GET_SIZE(given)
    else:
        return False
    return _hex_matches_buf(d, n, g, glen)


cdef bint _hex_matches_buf(const unsigned char* d, Py_ssize_t n, const char* g,
                           Py_ssize_t glen) noexcept:
    """The glen bytes at g spell digest d in hex, any case; no early exit once the length
    is right."""
    cdef Py_ssize_t i
    cdef char want[128]
    cdef unsigned char c, diff = 0
    if glen != 2 * n or n > 64:
        return False
    _to_hex(d, n, want)
    for i in range(glen):
        c = <unsigned char>g[i]
        c |= (<unsigned char>(c - 65) < 26) << 5  # ASCII A-Z -> a-z, branch-free
        diff |= c ^ <unsigned char>want[i]
    return diff == 0


cpdef str hmac_sha256_hex(bytes key, bytes message):
    cdef unsigned char d[32]
    cdef char h[64]
    _hmac_sha256(key, message, d)
    _to_hex(d, 32, h)
    return PyUnicode_DecodeLatin1(h, 64, NULL)


cpdef bint constant_time_equal(bytes a, bytes b):
    """Compares without an early exit, so timing does not reveal the matching prefix."""
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(a)
    cdef unsigned char diff = 0
    cdef const unsigned char* pa = <const unsigned char*>PyBytes_AS_STRING(a)
    cdef const unsigned char* pb = <const unsigned char*>PyBytes_AS_STRING(b)
    if n != PyBytes_GET_SIZE(b):
        return False
    for i in range(n):
        diff |= pa[i] ^ pb[i]
    return diff == 0


cpdef bint verify_hmac(bytes key, bytes message, object signature):
    """True when signature (hex, any case) is HMAC-SHA256(key, message)."""
    cdef unsigned char d[32]
    if not isinstance(signature, (str, bytes)):
        return False
    _hmac_sha256(key, message, d)
    return _hex_matches(d, 32, signature)


cdef void _md5(bytes body, unsigned char* out) noexcept:
    cdef MD5_CTX ctx
    MD5_Init(&ctx)
    MD5_Update(&ctx, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
    MD5_Final(out, &ctx)


cpdef bint verify_md5(bytes body, str md5_hex):
    """True when md5_hex (any case) is MD5(body): the HTTP API's body_md5 check."""
    cdef unsigned char d[16]
    if body is None:
        raise TypeError("body must be bytes")
    _md5(body, d)
    return _hex_matches(d, 16, md5_hex)


cpdef str api_string_to_sign(str method, str path, dict params):
    """Pusher's "{METHOD}\n{path}\n{query}": every parameter but auth_signature, keys
    lower-cased and sorted, joined k=v with & and not URL-escaped."""
    cdef list items = []
    for k, v in params.items():
        if k != "auth_signature":
            items.append((k.lower(), v))
    items.sort()
    cdef list parts = [method, "\n", path, "\n"]
    cdef bint first = True
    for k, v in items:
        if not first:
            parts.append("&")
        first = False
        parts.append(k)
        parts.append("=")
        parts.append(v)
    return "".join(parts)


# ---------------------------------------------------------------- channel names

cdef unsigned char _name_ok[256]  # Pusher's channel name characters
memset(_name_ok, 0, 256)
for _c in range(48, 58):  # 0-9
    _name_ok[_c] = 1
for _c in range(65, 91):  # A-Z, a-z
    _name_ok[_c] = _name_ok[_c + 32] = 1
for _c in (95, 45, 61, 64, 44, 46, 59):  # _ - = @ , . ;
    _name_ok[_c] = 1


cdef bint _ascii_all_in(str s, const unsigned char* table) except -1:
    """s is non-empty ASCII and each of its characters is marked in table."""
    cdef const char* p
    cdef Py_ssize_t i, n
    if not PyUnicode_IS_ASCII(s):
        return False
    p = PyUnicode_AsUTF8AndSize(s, &n)
    if n == 0:
        return False
    for i in range(n):
        if not table[<unsigned char>p[i]]:
            return False
    return True


cpdef bint name_chars_ok(str name):
    """True when name is non-empty and only A-Z a-z 0-9 _ - = @ , . ; (Pusher's channel
    name characters)."""
    return _ascii_all_in(name, _name_ok)


# ---------------------------------------------------------------- channel kinds

# kind bits (fastrelay/channels.py re-exports these; they are classified here because the
# trigger's checks run in the core)
PRIVATE = 1  # needs a signed auth
PRESENCE = 2
ENCRYPTED = 4
CACHE = 8
USER = 16  # #server-to-user-{id}: only that signed-in user
MAX_CHANNEL_NAME = 200
USER_PREFIX = "#server-to-user-"
cdef tuple _KIND_PREFIXES = (
    ("private-encrypted-cache-", PRIVATE | ENCRYPTED | CACHE),
    ("private-encrypted-", PRIVATE | ENCRYPTED),
    ("private-cache-", PRIVATE | CACHE),
    ("private-", PRIVATE),
    ("presence-cache-", PRIVATE | PRESENCE | CACHE),
    ("presence-", PRIVATE | PRESENCE),
    ("cache-", CACHE),
)


cpdef int channel_kind(str name) except -1:
    """The kind bits of a channel name (0 for a public channel)."""
    cdef Py_UCS4 first
    if not name:
        return 0
    first = name[0]
    if first != u"p" and first != u"c" and first != u"#":
        return 0  # most channels are public: skip the prefix walk
    for prefix, kind in _KIND_PREFIXES:
        if name.startswith(prefix):
            return kind
    if name.startswith(USER_PREFIX):
        return USER
    return 0


cpdef str channel_name_error(object name):
    """Why a channel name is invalid, or None."""
    if not isinstance(name, str) or not name:
        return "channel name is missing"
    if len(<str>name) > MAX_CHANNEL_NAME:
        return f"channel name is longer than {MAX_CHANNEL_NAME} characters"
    if (<str>name).startswith(USER_PREFIX):
        return (None if _ascii_all_in((<str>name)[len(USER_PREFIX):], _name_ok)
                else "invalid user channel name")
    if not _ascii_all_in(<str>name, _name_ok):
        return "channel name may only contain A-Z a-z 0-9 _ - = @ , . ;"
    return None


cpdef bint valid_socket_id(object value):
    """value looks like a socket id, "123.456" (digits, a dot, digits; at most 64 characters)."""
    cdef const char* p
    cdef Py_ssize_t n, i = 0, j
    if not isinstance(value, str) or not PyUnicode_IS_ASCII(value):
        return False
    p = PyUnicode_AsUTF8AndSize(value, &n)
    if n > 64:
        return False
    while i < n and 48 <= p[i] <= 57:
        i += 1
    if i == 0 or i == n or p[i] != 46:  # "."
        return False
    j = i + 1
    while j < n and 48 <= p[j] <= 57:
        j += 1
    return j == n and j > i + 1


# ---------------------------------------------------------------- the HTTP API's events

MAX_EVENT_NAME = 200
cdef tuple _TRIGGER_INFO = ("user_count", "subscription_count")


cpdef str event_data(Py_ssize_t max_payload, object raw):
    """An event's `data` as the string it is carried as (JSON text for any other value), or
    HttpError 413 when it is larger than max_payload bytes. Measured without copying."""
    cdef Py_ssize_t size
    if isinstance(raw, str):
        if PyUnicode_IS_ASCII(raw):
            size = len(<str>raw)
        else:
            size = len((<str>raw).encode())
        data = <str>raw
    else:
        encoded = _dumps(raw)
        size, data = len(encoded), encoded.decode()
    if size > max_payload:
        raise HttpError(413, f"data is larger than {max_payload} bytes")
    return data


cpdef dict json_body(bytes body):
    """A request's JSON object body, or a 400 that says what is wrong with it."""
    try:
        item = _loads(body)
    except _JSONDecodeError:
        raise HttpError(400, "the body is not valid JSON") from None
    if not isinstance(item, dict):
        raise HttpError(400, "the body must be a JSON object")
    return <dict>item


cpdef int api_checks(app, Request req, bint draining) except -1:
    """What every HTTP API request passes before its route runs: the signature (401), the app
    enabled (403), and no new events while the node drains (503)."""
    problem = check_api_request(app.key, app.secret_bytes, req.method, req.path, req.query,
                                req.body)
    if problem is not None:
        raise HttpError(401, problem)
    if not app.enabled:
        raise HttpError(403, "app is disabled")
    if draining and req.method == "POST":
        raise HttpError(503, "draining")
    return 0


cdef str EVENTS_ROUTE = "pusher:events"  # the hot route's label in the metrics


cdef str _events_app_id(Request req):
    """The {id} of POST /apps/{id}/events (the hot route), or None for any other request."""
    cdef str path = req.path
    cdef Py_ssize_t n = len(path), slash
    if req.method != "POST" or n < 13 or not path.startswith("/apps/") or not path.endswith("/events"):
        return None
    slash = path.find("/", 6)
    return path[6:n - 7] if slash == n - 7 else None


def on_request(node, Conn conn, Request req):
    """Node.on_request, every HTTP request's entry. The hot route, POST /apps/{id}/events,
    runs compiled from here to its metrics count; other routes, and the hot route's rare
    endings (channel counts asked for, an error), go to HttpApi. Through Python (on_request,
    HttpApi.handle, HttpApi.trigger, Ops.count_http) it ran four frames per event."""
    app_id = _events_app_id(req)
    http = node.http
    if app_id is None:
        http.handle(conn, req)
        return
    try:
        asked = trigger(node, conn, req, app_id)
    except Exception as exc:
        http.finish(conn, req, EVENTS_ROUTE, exc)
        return
    if asked is not None:
        http.answer_counts(conn, req, asked)
    elif node.ops is not None:
        count_http(node.ops, EVENTS_ROUTE, conn.status)


cpdef count_http(ops, str route, int status):
    """Ops.count_http: one more answer with this status on this route."""
    counts = ops.http
    key = (route, status)
    counts[key] = counts.get(key, 0) + 1


cpdef trigger(node, Conn conn, Request req, str app_id):
    """POST /apps/{id}/events, the HTTP API's hot path, compiled whole: the app, api_checks,
    the event's fields, admission (rate limit 429, then audit and bus, or 503) and the
    answer, which leaves before the fan-out. Returns None once answered, or (app, event,
    info attributes) when the publisher asked for channel counts, which the caller answers
    from a task. Through Python (the app lookup, admit and accept) it ran five more frames
    per event."""
    app = node.apps.ids.get(unquote(app_id))
    if app is None:
        raise HttpError(404, "unknown app")
    api_checks(app, req, node.draining)
    event, attrs = api_event(app, json_body(req.body), False)
    intake = node.intake
    gate(intake, app, 1)
    admit(intake, [event])
    if attrs:
        return app, event, attrs
    conn.respond(200, b"{}", b"application/json", None, req.keep_alive)
    return None


cpdef int gate(intake, app, Py_ssize_t cost) except -1:
    """Intake.gate, the per-app rate limit (HttpError 429 with the headers clients back off
    by) that every API event passes: an unlimited app, the default, costs one attribute read
    here; a limited one goes on to Intake.limit."""
    if app.rate_limit > 0:
        intake.limit(app, cost)
    return 0


cpdef admit(intake, list events, replay_of=None):
    """Intake.admit, the last step of every API: the events accepted (Node.accept: audit,
    then bus), or HttpError 503 when the audit cannot take them; then the observers (Redis,
    the console's feed) are told."""
    if not accept(intake.node, events, replay_of):
        raise HttpError(503, "the audit queue is full; retry shortly", [("Retry-After", "1")])
    if intake.observers is not None:
        intake.accepted(events)


cpdef accept(node, list events, replay_of=None):
    """Node.accept, the pipeline after intake: audit, then the bus. False when the audit
    cannot take them (the caller answers 503: an event is accepted only once it is queued for
    the audit). `replay_of`: the original id, when these re-send an audited event."""
    audit = node.audit
    stats = node.stats
    if audit is not None:
        # a batch is checked whole, so it is accepted whole; one event, by record() alone
        if len(events) > 1 and not audit.has_room(len(events)):
            stats.audit_refused += 1
            return False
        record = audit.record
        for ev in events:
            if not record(ev, replay_of):  # the journal could not be written (disk full)
                stats.audit_refused += 1
                return False
    publish = node.bus.publish
    for ev in events:
        stats.published += 1
        publish(ev)
    return True


cdef inline double _wall() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cpdef deliver(node, Event event):
    """Node.deliver, fan-out on this worker, compiled (it runs for every event on every
    worker): one frame per channel, the same bytes to every subscriber; returns how many were
    sent. An event nobody here listens to (and no cache keeps) costs a lookup per channel."""
    cdef Py_ssize_t sent = 0
    cdef int kind
    cfg = node.cfg
    ttl = cfg.event_ttl
    if ttl and _wall() - event.accepted_at > ttl:
        node.stats.stale_dropped += 1
        return 0
    exclude = find_socket(event.socket_id) if event.socket_id else None
    entries = node.channels.entries
    for name in event.channels:
        found = entries.get((event.app_id, name))
        if found is None:
            kind = channel_kind(name)
            if not kind & CACHE:
                continue  # nobody here to send to, nothing to keep: no frame to encode
        else:
            kind = (<Channel>found).kind
        msg = {"event": event.name, "channel": name, "data": event.data}
        if event.user_id is not None:
            msg["user_id"] = event.user_id
        frame = encode_frame(_dumps(msg))
        if kind & CACHE:
            node.caches[(event.app_id, name)] = (frame, _now() + cfg.cache_ttl, event)
        if found is not None:
            sent += (<Channel>found).fanout(frame, exclude)
    if sent:
        stats = node.stats
        stats.deliveries += sent
        stats.latency.observe(_wall() - event.accepted_at)
        if isinstance(event.data, str):
            stats.delivered_data_bytes += sent * len(<str>event.data)
    ops = node.ops
    if ops is not None and ops.console:  # the console's live feed, only while one is open
        ops.tap(event, sent)
    return sent


cpdef deliver_soon(node, Event event):
    """Node.deliver_soon, compiled (the local bus's publish: it runs for every accepted
    event): local delivery of an event published on this worker, after the current callback.
    The HTTP answer (sent at once) leaves before the fan-out, and the events of one loop turn
    fan out together, so each socket gets them in one send. In Python, this, the bus's
    publish and the fan-out callback were the three Python frames left on a trigger's path."""
    cdef list local = node._local
    local.append(event)
    if len(local) == 1:
        node.loop.call_soon(_deliver_local, node)


def _deliver_local(node):
    cdef list events = node._local
    node._local = []
    for ev in events:
        try:
            deliver(node, <Event>ev)
        except Exception:
            _log.exception("fan-out failed", extra={"event": (<Event>ev).id})
    flush_all()  # now, not one loop turn later


cpdef api_event(app, dict item, bint batch):
    """A Pusher HTTP API event checked field by field (a trigger's body, or one item of a
    batch, which names one `channel`): (Event, its `info` attributes), or HttpError 400/413
    saying what is wrong."""
    cdef Py_ssize_t n
    cdef bint encrypted = False
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise HttpError(400, "name is required")
    if len(<str>name) > MAX_EVENT_NAME:
        raise HttpError(400, f"name is longer than {MAX_EVENT_NAME} characters")
    if batch:
        chans = [item.get("channel")]
    else:
        chans = item.get("channels")
        if chans is None:
            chans = [item.get("channel")]
    if not isinstance(chans, list) or not chans:
        raise HttpError(400, "channels must be a non-empty list")
    n = len(<list>chans)
    if n > app.max_channels_per_event:
        raise HttpError(400, f"at most {app.max_channels_per_event} channels per event")
    for ch in <list>chans:
        problem = channel_name_error(ch)
        if problem is not None:
            raise HttpError(400, f"{problem}: {str(ch)[:100]!r}")
        if channel_kind(ch) & ENCRYPTED:
            encrypted = True
    if encrypted and n > 1:
        raise HttpError(400, "cannot trigger to several channels when one is encrypted")
    data = item.get("data")
    if data is None:
        raise HttpError(400, "data is required")
    data = event_data(app.max_event_payload, data)
    socket_id = item.get("socket_id")
    if socket_id is not None and not valid_socket_id(socket_id):
        raise HttpError(400, "socket_id must look like 123.456")
    info = item.get("info")
    attrs = []
    if info is not None:
        if not isinstance(info, str):
            raise HttpError(400, "info must be a comma-separated string")
        attrs = [a for a in (<str>info).split(",") if a]
        for a in attrs:
            if a not in _TRIGGER_INFO:
                raise HttpError(400, f"unknown info attribute {a[:40]!r}")
    return Event(app.id, chans, name, data, socket_id, "api"), attrs


cdef enum:
    API_FAST_PARAMS = 16      # more parameters than this take the generic path
    API_FAST_BYTES = 2048     # so does a longer string to sign
TIMESTAMP_WINDOW = 600        # seconds, as Pusher and Sockudo enforce


cdef struct Pairs:
    # a request's signed parameters, as pointers into their strings (no Python objects)
    Py_ssize_t n
    const char* ks[API_FAST_PARAMS]
    const char* vs[API_FAST_PARAMS]
    Py_ssize_t kn[API_FAST_PARAMS]
    Py_ssize_t vn[API_FAST_PARAMS]
    Py_ssize_t used
    char lower[API_FAST_BYTES]  # the lower-cased keys, back to back


cdef bint _pairs_add(Pairs* q, const char* k, Py_ssize_t kn, const char* v,
                     Py_ssize_t vn) noexcept:
    """Adds k=v (k lower-cased, as str.lower() does for ASCII), unless it is auth_signature;
    False when there is no room (the caller takes the general path)."""
    cdef Py_ssize_t i
    if kn == 14 and memcmp(k, b"auth_signature", 14) == 0:
        return True
    if q.n == API_FAST_PARAMS or q.used + kn > API_FAST_BYTES:
        return False
    for i in range(kn):
        q.lower[q.used + i] = k[i] + 32 if 65 <= k[i] <= 90 else k[i]
    q.ks[q.n] = q.lower + q.used
    q.kn[q.n] = kn
    q.vs[q.n] = v
    q.vn[q.n] = vn
    q.used += kn
    q.n += 1
    return True


cdef bint _pairs_from_dict(dict params, Pairs* q) except -1:
    """The parsed parameters into q; False when one is not plain ASCII or there are too many."""
    cdef Py_ssize_t pos = 0, m, vn
    cdef PyObject* k
    cdef PyObject* v
    cdef const char* kp
    cdef const char* vp
    q.n = q.used = 0
    while PyDict_Next(params, &pos, &k, &v):
        if not isinstance(<object>k, str) or not isinstance(<object>v, str) \
                or not PyUnicode_IS_ASCII(<object>k) or not PyUnicode_IS_ASCII(<object>v):
            return False
        kp = PyUnicode_AsUTF8AndSize(<object>k, &m)
        vp = PyUnicode_AsUTF8AndSize(<object>v, &vn)
        if not _pairs_add(q, kp, m, vp, vn):
            return False
    return True


cdef Py_ssize_t _sts_join(str method, str path, Pairs* q, char* out) except -2:
    """api_string_to_sign of q into out (API_FAST_BYTES) without a Python object: its length,
    or -1 when something is not plain ASCII or too big (the caller takes api_string_to_sign).
    tests/test_signatures.py checks the two agree."""
    cdef Py_ssize_t n = q.n, used = 0, i, j, m, c, a, b, tn
    cdef const char* tp
    # insertion sort by (key, value), as sorting the (k.lower(), v) pairs does
    for i in range(1, n):
        j = i
        while j > 0:
            a, b = j - 1, j
            c = memcmp(q.ks[a], q.ks[b], q.kn[a] if q.kn[a] < q.kn[b] else q.kn[b])
            if c == 0:
                c = (q.kn[a] > q.kn[b]) - (q.kn[a] < q.kn[b])
            if c == 0:
                c = memcmp(q.vs[a], q.vs[b], q.vn[a] if q.vn[a] < q.vn[b] else q.vn[b])
                if c == 0:
                    c = (q.vn[a] > q.vn[b]) - (q.vn[a] < q.vn[b])
            if c <= 0:
                break
            q.ks[a], q.ks[b] = q.ks[b], q.ks[a]
            q.kn[a], q.kn[b] = q.kn[b], q.kn[a]
            q.vs[a], q.vs[b] = q.vs[b], q.vs[a]
            q.vn[a], q.vn[b] = q.vn[b], q.vn[a]
            j -= 1
    if not PyUnicode_IS_ASCII(method) or not PyUnicode_IS_ASCII(path):
        return -1
    for i in range(-2, n):
        m = 0
        if i == -2:
            tp = PyUnicode_AsUTF8AndSize(method, &tn)
        elif i == -1:
            tp = PyUnicode_AsUTF8AndSize(path, &tn)
        else:
            tp, tn, m = q.ks[i], q.kn[i], q.vn[i]
        if used + tn + m + 2 > API_FAST_BYTES:
            return -1
        memcpy(out + used, tp, tn)
        used += tn
        if i < 0:
            out[used] = 10  # "\n"
            used += 1
            continue
        out[used] = 61  # "="
        memcpy(out + used + 1, q.vs[i], q.vn[i])
        used += 1 + q.vn[i]
        if i < n - 1:
            out[used] = 38  # "&"
            used += 1
    return used


cdef bint _next_param(const char** pos, const char* end, const char** k, Py_ssize_t* kn,
                      const char** v, Py_ssize_t* vn) noexcept:
    """The next "k=v" of a query string at *pos (empty pieces skipped), as pointers into it;
    *v is NULL when the piece has no "=". False at the end."""
    cdef const char* part = pos[0]
    cdef const char* amp
    cdef const char* eq
    while part < end:
        amp = <const char*>memchr(part, 38, end - part)  # '&'
        if amp == NULL:
            amp = end
        if amp > part:
            eq = <const char*>memchr(part, 61, amp - part)  # '='
            k[0] = part
            kn[0] = (eq if eq != NULL else amp) - part
            v[0] = eq + 1 if eq != NULL else NULL
            vn[0] = amp - eq - 1 if eq != NULL else 0
            pos[0] = amp + 1
            return True
        part = amp + 1
    pos[0] = end
    return False


cdef bint _field_is(const char* k, Py_ssize_t kn, const char* name, Py_ssize_t n) noexcept:
    return kn == n and memcmp(k, name, n) == 0


cdef int _check_raw_query(str app_key, bytes secret, str method, str path, str query,
                          bytes body, double now) except -2:
    """The common request checked straight from its query string, with no Python object:
    1 valid, 0 refused, -1 not the common shape (escapes, non-ASCII, a repeated parameter,
    too many): the caller then takes the general path, which also words the refusal."""
    cdef Pairs q
    cdef const char* p
    cdef const char* end
    cdef const char* kp
    cdef const char* vp
    cdef const char* key = NULL
    cdef const char* ts = NULL
    cdef const char* ver = NULL
    cdef const char* md5 = NULL
    cdef const char* sig = NULL
    cdef Py_ssize_t n, kn, vn, keyn = 0, tsn = 0, vern = 0, md5n = 0, sign = 0, i, j, an
    cdef long long t = 0
    cdef char buf[API_FAST_BYTES]
    cdef unsigned char d[32]
    cdef unsigned char m5[16]
    if not query or not PyUnicode_IS_ASCII(query) or not PyUnicode_IS_ASCII(app_key):
        return -1
    p = PyUnicode_AsUTF8AndSize(query, &n)
    if memchr(p, 37, n) != NULL or memchr(p, 43, n) != NULL:  # '%' or '+': escapes
        return -1
    end = p + n
    q.n = q.used = 0
    while _next_param(&p, end, &kp, &kn, &vp, &vn):
        if vp == NULL or not _pairs_add(&q, kp, kn, vp, vn):
            return -1
        if _field_is(kp, kn, b"auth_key", 8):
            key, keyn = vp, vn
        elif _field_is(kp, kn, b"auth_timestamp", 14):
            ts, tsn = vp, vn
        elif _field_is(kp, kn, b"auth_version", 12):
            ver, vern = vp, vn
        elif _field_is(kp, kn, b"body_md5", 8):
            md5, md5n = vp, vn
        elif _field_is(kp, kn, b"auth_signature", 14):
            sig, sign = vp, vn
    # a repeated key: the last one wins in parse_query; leave that to the general path
    for i in range(q.n):
        for j in range(i + 1, q.n):
            if q.kn[i] == q.kn[j] and memcmp(q.ks[i], q.ks[j], q.kn[i]) == 0:
                return -1
    kp = PyUnicode_AsUTF8AndSize(app_key, &an)
    if key == NULL or keyn != an or memcmp(key, kp, an) != 0:
        return 0
    if ts == NULL or tsn == 0 or tsn > 15:
        return 0
    for i in range(tsn):
        if not 48 <= ts[i] <= 57:
            return 0
        t = t * 10 + (ts[i] - 48)
    if now - <double>t > TIMESTAMP_WINDOW or <double>t - now > TIMESTAMP_WINDOW:
        return 0
    if ver != NULL and not _field_is(ver, vern, b"1.0", 3):
        return 0
    if body:
        if md5 == NULL:
            return 0
        _md5(body, m5)
        if not _hex_matches_buf(m5, 16, md5, md5n):
            return 0
    if sig == NULL:
        return 0
    n = _sts_join(method, path, &q, buf)
    if n < 0:
        return -1
    _hmac_sha256_buf(secret, buf, n, d)
    return 1 if _hex_matches_buf(d, 32, sig, sign) else 0


cpdef str check_api_request(str app_key, bytes secret, str method, str path, str query,
                            bytes body, double now=0):
    """Why a signed Pusher HTTP API request is refused (the 401's message), or None when it
    is valid: auth_key, a timestamp within TIMESTAMP_WINDOW (`now`: Unix seconds; 0 for the
    clock), auth_version, body_md5 and the HMAC. `query`: the raw query string."""
    cdef timespec clock
    if now == 0:
        clock_gettime(CLOCK_REALTIME, &clock)
        now = clock.tv_sec + clock.tv_nsec * 1e-9
    if _check_raw_query(app_key, secret, method, path, query, body, now) == 1:
        return None
    return _api_problem(app_key, secret, method, path, parse_query(query), body, now)


cdef str _api_problem(str app_key, bytes secret, str method, str path, dict params,
                      bytes body, double now):
    """check_api_request's general path, on the parsed parameters; it words each refusal."""
    cdef Pairs q
    cdef char buf[API_FAST_BYTES]
    cdef unsigned char d[32]
    cdef Py_ssize_t n = -1
    if params.get("auth_key") != app_key:
        return "auth_key is missing or does not match the app"
    ts = params.get("auth_timestamp", "")
    if not isinstance(ts, str) or not (ts.isascii() and ts.isdigit()):  # '²'.isdigit()
        return "auth_timestamp is missing"
    if len(ts) > 15 or abs(now - <double>int(ts)) > TIMESTAMP_WINDOW:
        return f"auth_timestamp is more than {TIMESTAMP_WINDOW} s from the server's time"
    if params.get("auth_version", "1.0") != "1.0":
        return "auth_version must be 1.0"
    if body:
        md5 = params.get("body_md5")
        if md5 is None:
            return "body_md5 is required with a body"
        if not verify_md5(body, md5):
            return "body_md5 does not match the body"
    signature = params.get("auth_signature")
    if not signature:
        return "auth_signature is missing"
    if _pairs_from_dict(params, &q):
        n = _sts_join(method, path, &q, buf)
    if n >= 0:
        _hmac_sha256_buf(secret, buf, n, d)
        if _hex_matches(d, 32, signature):
            return None
    elif verify_hmac(secret, api_string_to_sign(method, path, params).encode(), signature):
        return None
    return ("Invalid signature: you should have sent HmacSHA256Hex("
            f"{api_string_to_sign(method, path, params)!r}, your_secret_key)")


# ---------------------------------------------------------------- query strings

cdef inline int _hexval(char ch) noexcept:
    if 48 <= ch <= 57:
        return ch - 48
    if 97 <= ch <= 102:
        return ch - 87
    if 65 <= ch <= 70:
        return ch - 55
    return -1


cpdef str unquote(str s):
    """Percent-decoding with '+' as space, as query strings use."""
    if "%" not in s and "+" not in s:
        return s
    cdef bytes raw = s.encode("utf-8")
    cdef const char* p = PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), i = 0, j = 0
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef char* o = PyBytes_AS_STRING(out)
    cdef int hi, lo
    while i < n:
        if p[i] == 37 and i + 2 < n:
            hi = _hexval(p[i + 1])
            lo = _hexval(p[i + 2])
            if hi >= 0 and lo >= 0:
                o[j] = <char>(hi * 16 + lo)
                i += 3
                j += 1
                continue
        o[j] = 32 if p[i] == 43 else p[i]
        i += 1
        j += 1
    return out[:j].decode("utf-8", "replace")


cdef str _unquote_ascii(const char* p, Py_ssize_t n):
    """unquote() of an ASCII slice, without making a str of the raw slice first."""
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] == 37 or p[i] == 43:  # '%' or '+'
            return unquote(PyUnicode_DecodeLatin1(p, n, NULL))
    return PyUnicode_DecodeLatin1(p, n, NULL)


cpdef dict parse_query(str query):
    """'a=1&b=2' -> {'a': '1', 'b': '2'}; the last value wins, as in Pusher's signing."""
    cdef dict out = {}
    cdef const char* p
    cdef const char* end
    cdef const char* kp
    cdef const char* vp
    cdef Py_ssize_t n, kn, vn
    if not query:
        return out
    if not PyUnicode_IS_ASCII(query):
        for piece in query.split("&"):
            if piece:
                k, sep, v = piece.partition("=")
                out[unquote(k)] = unquote(v)
        return out
    p = PyUnicode_AsUTF8AndSize(query, &n)  # an ASCII str's own buffer: no copy
    end = p + n
    while _next_param(&p, end, &kp, &kn, &vp, &vn):
        out[_unquote_ascii(kp, kn)] = _unquote_ascii(vp, vn) if vp != NULL else ""
    return out
