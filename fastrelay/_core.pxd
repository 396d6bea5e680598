# Declarations of the compiled hot path (see _core.pyx and docs/ARCHITECTURE.md).

cdef enum ConnState:
    S_HTTP = 0       # reading HTTP/1.1 requests (API, health, upgrade)
    S_WS = 1         # open WebSocket
    S_CLOSING = 2    # close frame sent, waiting for the peer's
    S_CLOSED = 3     # transport gone
    S_DRAIN = 4      # HTTP answer sent with Connection: close, waiting for the peer's FIN


cdef class Request:
    cdef public str method
    cdef public str path
    cdef public str query
    cdef public dict headers
    cdef public bytes body
    cdef public bint keep_alive


cdef class Conn:
    # Declared in this order so nothing is padded: with the GC and object headers the
    # instance is 144 bytes (a pymalloc size class), not 160. Every idle socket holds one.
    cdef object transport
    cdef int fd
    cdef int slot                # index in the connection table (the socket id's second part)
    cdef object inbuf            # bytearray of unparsed input, or None
    cdef object pend             # the single pending outbound frame (bytes), or None
    cdef char* obuf              # pending outbound bytes once more than one frame is queued
    cdef unsigned int olen
    cdef unsigned int ocap
    cdef public unsigned char state  # a ConnState
    cdef unsigned char queued    # in the dirty list for this loop iteration
    cdef unsigned char blocked   # the transport holds unsent bytes (paused)
    cdef readonly unsigned char held  # an HTTP answer is being prepared asynchronously
    cdef unsigned char ping_sent
    cdef unsigned char req_started  # part of an HTTP request is buffered (slowloris clock runs)
    cdef readonly unsigned short status  # the last HTTP status sent (metrics)
    cdef unsigned int last_seen  # monotonic ms (32 bits, wrapping: compare differences)
    cdef unsigned int since      # start of the current state (handshake, closing, ping)
    cdef unsigned long long sid  # the socket id's random first part (0 until the upgrade)

    # Pusher state, owned by fastrelay/protocol.py
    cdef public object app
    cdef public object channels   # list of Channel, or None
    cdef public object user_id    # set by pusher:signin
    cdef public unsigned int ev_window  # client-event rate window (monotonic seconds)
    cdef public unsigned int ev_count

    cdef int _queue(self, bytes frame) except -1
    cdef int _flush(self) except -1
    cdef int _send_now(self, bytes data) except -1
    cdef int _send_simple(self, bytes line, bytes content_type, bytes body) except -1
    cdef int _send_buf(self, const char* data, Py_ssize_t n) except -1
    cdef int _parse_http(self) except -1
    cdef int _http_error(self, int status, str message) except -1
    cdef bint _http_whole(self, bytes data) except -1
    cdef int _process_ws_buffer(self) except -1
    cdef Py_ssize_t _parse_ws(self, const unsigned char* buf, Py_ssize_t n) except -1
    cdef int _control(self, int opcode, bytes payload) except -1
    cdef int _fail(self, int code, str reason) except -1
    cpdef respond(self, int status, bytes body, bytes content_type=*, object headers=*,
                  bint keep_alive=*)


cdef class Channel:
    cdef public object app_id
    cdef public str name
    cdef public dict members      # Conn -> presence user id (or None)
    cdef public object roster     # presence: user id -> [connections, user_info]; else None
    cdef public int kind

    cpdef int fanout(self, bytes frame, Conn exclude=*) except -1


cdef class Event:
    cdef public object app_id
    cdef public object channels   # list of channel names
    cdef public object name
    cdef public object data
    cdef public object socket_id
    cdef public object source
    cdef public object id
    cdef public double accepted_at
    cdef public object user_id

    cpdef tuple audit_row(self, replay_of=*)
