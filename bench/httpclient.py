"""A tiny keep-alive HTTP/1.1 client on asyncio.Protocol: one request in flight per connection.

Library clients (aiohttp, httpx) spend tens of microseconds per request in Python; this one
writes a pre-built request with one transport.write and parses only the status line,
Content-Length / chunked framing, so the publisher is not the bottleneck.
"""

from __future__ import annotations

import asyncio


class HTTPError(Exception):
    pass


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.must_close = False  # server said "Connection: close" (Soketi does, every time)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass; duck-type it.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(HTTPError(f"connection lost: {exc}"))
        self.waiter = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is None:
            return
        r = self._parse()
        if r is not None:
            self.waiter = None
            if not w.done():
                w.set_result(r)

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buf
        he = buf.find(b"\r\n\r\n")
        if he < 0:
            return None
        head = bytes(buf[:he]).lower()
        if b"\nconnection: close" in head:
            self.must_close = True
        try:
            status = int(head[9:12])
        except ValueError as e:
            raise HTTPError(f"bad status line {head[:40]!r}") from e
        i = head.find(b"\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r", i + 16)
            n = int(head[i + 16 : j if j >= 0 else len(head)])
            end = he + 4 + n
            if len(buf) < end:
                return None
            body = bytes(buf[he + 4 : end])
            del buf[:end]
            return status, body
        if b"\ntransfer-encoding: chunked" in head:
            pos = he + 4
            body = bytearray()
            while True:
                le = buf.find(b"\r\n", pos)
                if le < 0:
                    return None
                size = int(bytes(buf[pos:le]).split(b";")[0], 16)
                if len(buf) < le + 2 + size + 2:
                    return None
                body += buf[le + 2 : le + 2 + size]
                pos = le + 2 + size + 2
                if size == 0:
                    del buf[:pos]
                    return status, bytes(body)
        # No length: only valid for bodiless statuses here.
        del buf[: he + 4]
        return status, b""


def _expire(fut: asyncio.Future[tuple[int, bytes]]) -> None:
    if not fut.done():
        fut.set_exception(HTTPError("request timed out"))


class HTTPConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.proto: _Conn | None = None
        self.host_header = f"{host}:{port}"
        self.connects = 0

    async def connect(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(_Conn, self.host, self.port), timeout
        )
        self.proto = proto
        self.connects += 1

    def build(self, method: str, target: str, body: bytes, headers: str = "") -> bytes:
        return (
            f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{headers}\r\n"
        ).encode() + body

    async def request_raw(self, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
        """Send one pre-built request and wait for its response; reconnect once if closed."""
        p = self.proto
        if p is None or p.closed or p.must_close:
            if p is not None:
                self.close()
            await self.connect()
            p = self.proto
        assert p is not None and p.transport is not None
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        p.waiter = fut
        p.transport.write(raw)
        if p.buf:
            r = p._parse()
            if r is not None:
                p.waiter = None
                return r
        # call_later instead of wait_for: wait_for wraps every request in a Task.
        th = asyncio.get_running_loop().call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            th.cancel()

    async def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        raw = (f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\n\r\n").encode()
        return await self.request_raw(raw, timeout)

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None


async def http_get_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    c = HTTPConnection(host, port)
    try:
        await c.connect(timeout)
        st, _ = await c.get(path, timeout)
        return st
    except (TimeoutError, OSError, HTTPError):
        return None
    finally:
        c.close()
