"""Runs one worker: the event loop, the listening socket, the node and its background tasks."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from pathlib import Path

from . import _core
from .apps import AppManager
from .audit import AuditLog, open_audit
from .bus import Bus, LocalBus
from .config import Config
from .intake import Intake
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


def cluster_secret(cfg: Config) -> bytes:
    """The deployment's shared secret; on one host a generated one is kept in the data dir."""
    if cfg.cluster_secret:
        return cfg.cluster_secret.encode()
    path = Path(cfg.data_dir) / "cluster-secret"
    try:
        return path.read_bytes().strip()
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return value


def make_bus(cfg: Config) -> Bus:
    return LocalBus()


def make_redis(cfg: Config):  # noqa: ANN201 (redis is imported lazily)
    if not cfg.redis_url:
        return None
    import redis.asyncio as aioredis

    return aioredis.from_url(cfg.redis_url)


async def serve(cfg: Config, apps: AppManager, sock: socket.socket | None = None,
                stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    audit: AuditLog | None = None
    if cfg.audit:
        audit = open_audit(cfg.database_url or None, Path(cfg.data_dir),
                           retention_days=cfg.audit_retention_days)
        await audit.start()
    redis = make_redis(cfg)
    node = Node(cfg, apps, loop, make_bus(cfg), audit)
    node.intake = Intake(node, cluster_secret(cfg), redis)
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
    log.info("listening", extra={"host": cfg.host, "port": cfg.port,
                                 "audit": "postgresql" if cfg.database_url else
                                 ("sqlite" if audit else "off")})
    await stop.wait()
    await shutdown(node, server)
    sweep_task.cancel()
    if node.intake.observers is not None:
        await node.intake.observers.close()
    if audit is not None:
        await audit.close()  # flushes: nothing accepted is lost on a clean stop
    if redis is not None:
        await redis.aclose()
    log.info("stopped")


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
