"""Runs one worker: the event loop, the listening socket, the node and its background tasks."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from . import _core
from .apps import AppManager
from .bus import Bus, LocalBus
from .config import Config
from .node import Node

log = logging.getLogger("fastrelay.server")


def listen_socket(host: str, port: int) -> socket.socket:
    """SO_REUSEPORT lets several workers share the port; the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def make_bus(cfg: Config) -> Bus:
    return LocalBus()


async def serve(cfg: Config, apps: AppManager, sock: socket.socket | None = None,
                stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    node = Node(cfg, apps, loop, make_bus(cfg))
    _core.configure(node, loop, max_header=cfg.max_header_size, max_body=cfg.max_body_size,
                    max_frame=cfg.max_message_size, max_outbound=cfg.max_outbound_buffer)
    await node.bus.start(node)
    sock = sock or listen_socket(cfg.host, cfg.port)
    server = await loop.create_server(_core.Conn, sock=sock)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(cfg.sweep_interval)
            node.sweep()

    sweep_task = loop.create_task(sweeper())
    log.info("listening", extra={"host": cfg.host, "port": cfg.port})
    await stop.wait()
    await shutdown(node, server)
    sweep_task.cancel()


async def shutdown(node: Node, server: asyncio.AbstractServer, timeout: float = 5.0) -> None:
    """Stops accepting, tells clients to reconnect elsewhere (4200), waits for them to go."""
    node.draining = True
    server.close()
    closed = node.close_all(4200, "Server shutting down")
    log.info("draining", extra={"websockets": closed})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _core.connection_count() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for conn in _core.connections():
        conn.abort()
    await node.bus.close()
    log.info("stopped")
