"""Drives the compiled core's parsers in-process, with no socket and no event loop.

`Harness` binds fastrelay._core to a fake handler and a fake loop, opens one `Conn` on a fake
transport, and feeds it bytes through `data_received`, exactly as uvloop would. The handler
answers HTTP requests (upgrades on /app/..., 200 otherwise) and records WebSocket messages, so
everything the core itself does (HTTP/1.1 parsing, limits, WebSocket framing, masking,
reassembly, control frames, close handshake) runs, and nothing of the Pusher logic does.

Used by tests/test_fuzz.py (hypothesis) and tests/fuzz/fuzz_core.py (atheris).
"""

from __future__ import annotations

from fastrelay import _core


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.eof = False

    def get_extra_info(self, name, default=None):
        return default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def write(self, data):
        self.out += data

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def get_write_buffer_size(self):
        return 0

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return self.closed


class FakeLoop:
    def __init__(self) -> None:
        self.pending: list = []

    def call_soon(self, fn, *args):
        self.pending.append((fn, args))

    def run(self) -> None:
        for _ in range(1000):
            if not self.pending:
                return
            fn, args = self.pending.pop(0)
            fn(*args)
        raise AssertionError("call_soon loop did not settle")


class Handler:
    def __init__(self, harness: Harness) -> None:
        self.h = harness

    def on_request(self, conn, req):
        self.h.requests.append(req)
        if req.path.startswith("/app/"):
            conn.accept_websocket(req)
        else:
            conn.respond(200, b"{}", b"application/json", None, req.keep_alive)

    def on_message(self, conn, payload):
        self.h.messages.append(payload)

    def on_close(self, conn):
        self.h.closed_ws = True

    def on_slow_consumer(self, conn):
        conn.close(4100, "slow")


class Harness:
    def __init__(self, max_header: int = 16384, max_body: int = 1 << 20, max_frame: int = 1 << 18) -> None:
        self.requests: list = []
        self.messages: list[bytes] = []
        self.closed_ws = False
        self.loop = FakeLoop()
        _core.configure(Handler(self), self.loop, max_header=max_header, max_body=max_body,
                        max_frame=max_frame, max_outbound=1 << 20)
        self.transport = FakeTransport()
        self.conn = _core.Conn()
        self.conn.connection_made(self.transport)
        self.loop.run()

    def feed(self, data: bytes) -> None:
        if self.transport.closed:
            return
        self.conn.data_received(data)
        self.loop.run()

    def feed_all(self, chunks) -> None:
        for c in chunks:
            self.feed(c)

    def output_http(self) -> bytes:
        return bytes(self.transport.out)

    def output_ws(self) -> bytes:
        """Server bytes after the 101 answer (the WebSocket frames)."""
        out = bytes(self.transport.out)
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), out[:200]
        return rest

    def close(self) -> None:
        self.loop.run()
        self.conn.connection_lost(None)
        self.loop.run()
