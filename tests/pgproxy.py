"""A TCP proxy in front of the real PostgreSQL that a test can cut, stall and restore: a dead
network path or a hung server, without touching the shared PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

PG_HOST, PG_PORT = "127.0.0.1", 5432


class PgProxy:
    """On the caller's event loop. cut() resets every connection and refuses new ones;
    while stalled, bytes are dropped (hold=False) or held until restore() (hold=True)."""

    def __init__(self, hold: bool = False) -> None:
        self.up = True
        self.stalled = False
        self.hold = hold
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                if self.stalled:
                    if not self.hold:
                        continue
                    while self.stalled and self.up:
                        await asyncio.sleep(0.01)
                w.write(data)
                await w.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if not self.up:
            cw.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection(PG_HOST, PG_PORT)
        except OSError:
            cw.transport.abort()
            return
        self._conns.update((cw, uw))
        try:
            await asyncio.gather(self._pipe(cr, uw), self._pipe(ur, cw))
        finally:
            self._conns.difference_update((cw, uw))

    def cut(self) -> None:
        self.up = False
        for w in list(self._conns):
            w.transport.abort()  # RST, like a dead network path or a crashed server

    def restore(self) -> None:
        self.up = True
        self.stalled = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class ThreadProxy:
    """A PgProxy (holding bytes while stalled) on its own thread and loop, for tests that
    drive a server process from plain synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.proxy = PgProxy(hold=True)
        self._call(self.proxy.start())
        self.port = self.proxy.port

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _do(self, fn: Any) -> None:
        fn()

    def cut(self) -> None:
        self._call(self._do(self.proxy.cut))

    def stall(self) -> None:
        self.proxy.stalled = True

    def restore(self) -> None:
        self._call(self._do(self.proxy.restore))

    async def _finish(self) -> None:
        await self.proxy.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:  # the pipes of connections still open
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self._call(self._finish())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
