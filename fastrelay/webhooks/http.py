"""A small asyncio HTTP/1.1 client for webhook POSTs: keep-alive per endpoint, one request at
a time per connection, a deadline on the whole exchange. Never blocks the loop."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit


class HttpError(Exception):
    """A network or protocol failure (the caller retries)."""


class _Target:
    __slots__ = ("host", "port", "path", "tls", "hostport")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"webhook url must be http(s)://host/...: {url!r}")
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        default = 443 if self.tls else 80
        self.hostport = self.host if self.port == default else f"{self.host}:{self.port}"


class HttpClient:
    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._idle: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._targets: dict[str, _Target] = {}
        self._ssl: ssl.SSLContext | None = None

    def _target(self, url: str) -> _Target:
        t = self._targets.get(url)
        if t is None:
            t = self._targets[url] = _Target(url)
        return t

    async def post(self, url: str, body: bytes, headers: list[tuple[str, str]]) -> int:
        """POSTs body; returns the status. Raises HttpError (or TimeoutError) on failure."""
        t = self._target(url)
        head = [f"POST {t.path} HTTP/1.1", f"Host: {t.hostport}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "User-Agent: fastrelay-webhooks"]
        head += [f"{k}: {v}" for k, v in headers]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (0, 1):
            conn = self._idle.pop(url, None)
            reused = conn is not None
            try:
                async with asyncio.timeout(self.timeout):
                    if conn is None:
                        if t.tls and self._ssl is None:
                            self._ssl = ssl.create_default_context()
                        conn = await asyncio.open_connection(t.host, t.port,
                                                             ssl=self._ssl if t.tls else None)
                    status, keep = await self._exchange(conn, request)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    TimeoutError) as e:
                if conn is not None:
                    conn[1].transport.abort()
                if reused and attempt == 0 and not isinstance(e, TimeoutError):
                    continue  # a stale keep-alive connection: try once on a new one
                if isinstance(e, TimeoutError):
                    raise HttpError(f"timed out after {self.timeout:g}s") from None
                raise HttpError(f"{type(e).__name__}: {e}") from None
            if keep:
                self._idle[url] = conn
            else:
                conn[1].transport.abort()
            return status
        raise HttpError("unreachable")

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        request: bytes) -> tuple[int, bool]:
        reader, writer = conn
        writer.write(request)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        keep = parts[0] == "HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            k = k.strip().lower()
            v = v.strip()
            if k == "content-length":
                length = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif k == "connection":
                keep = v.lower() == "keep-alive" or (keep and v.lower() != "close")
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length is not None:
            await reader.readexactly(length)
        elif status in (204, 304) or 100 <= status < 200:
            pass
        else:
            await reader.read()  # until close
            keep = False
        return status, keep

    async def close(self) -> None:
        for _, w in self._idle.values():
            w.transport.abort()
        self._idle.clear()
