"""Runs one worker: the event loop, the listening socket, the node and its background tasks."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
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


def make_bus(cfg: Config, secret: bytes) -> Bus:
    """In-process with no Redis; the Redis bus (and cluster-wide state) with redis_url."""
    if cfg.redis_url:
        from .bus.redis import RedisBus

        return RedisBus(cfg.redis_url, secret, cfg.key_prefix)
    return LocalBus()


def make_redis(cfg: Config):  # noqa: ANN201 (redis is imported lazily)
    if not cfg.redis_url:
        return None
    from .redisconn import connect

    return connect(cfg.redis_url)[0]


async def serve(cfg: Config, apps: AppManager, sock: socket.socket | None = None,
                stop: asyncio.Event | None = None) -> None:
    """One worker's life: build the pipeline, listen, wait for a stop, drain and close."""
    loop = asyncio.get_running_loop()
    apps_task = await start_apps_refresh(cfg, apps)  # first: webhooks depend on the apps
    node = await build_node(cfg, apps)
    sock = sock or listen_socket(cfg.host, cfg.port)
    # TLS: the core sees the SSL transport's sslcontext and writes through transport.write
    server = await loop.create_server(_core.Conn, sock=sock, ssl=tls_context(cfg))
    from .metrics import start_metrics_server

    metrics_server = (await start_metrics_server(node.ops, cfg.host, cfg.metrics_port)
                      if cfg.metrics_port else None)
    stop = stop or asyncio.Event()
    supervised = "FASTRELAY_WORKER" in os.environ  # a supervisor owns reloads and the pid file
    install_signals(cfg, stop, supervised)
    tell_ready()

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(cfg.sweep_interval)
            node.sweep()

    sweep_task = loop.create_task(sweeper())
    log.info("listening", extra={"host": cfg.host, "port": cfg.port,
                                 "audit": "postgresql" if cfg.database_url else
                                 ("sqlite" if node.audit else "off")})
    await stop.wait()
    t0 = loop.time()
    if metrics_server is not None:
        metrics_server.close()
    await shutdown(node, server, timeout=max(0.5, cfg.shutdown_timeout / 2))
    sweep_task.cancel()
    if apps_task is not None:
        apps_task.cancel()
    await close_node(node, deadline=t0 + cfg.shutdown_timeout)
    if not supervised:
        remove_pid_file(cfg)
    log.info("stopped", extra={"seconds": round(loop.time() - t0, 3)})


async def build_node(cfg: Config, apps: AppManager) -> Node:
    """The pipeline's parts, started in order: audit, node (intake, webhooks, metrics,
    cluster state), the compiled core, then the bus."""
    loop = asyncio.get_running_loop()
    audit: AuditLog | None = None
    if cfg.audit:
        worker = os.environ.get("FASTRELAY_WORKER")  # set by the supervisor
        audit = open_audit(cfg.database_url or None, Path(cfg.data_dir),
                           retention_days=cfg.audit_retention_days,
                           flush_interval=cfg.audit_flush_interval, batch_rows=cfg.audit_batch_rows,
                           journal=cfg.audit_journal,
                           spill_dir=Path(cfg.data_dir) / f"worker-{worker}" if worker else None)
        await audit.start()
    redis = make_redis(cfg)
    secret = cluster_secret(cfg)
    node = Node(cfg, apps, loop, make_bus(cfg, secret), audit)
    node.intake = Intake(node, secret, redis)
    node.redis = redis
    if any(a.webhooks for a in apps.all()):
        from .webhooks import WebhookManager

        node.webhooks = WebhookManager(cfg, apps, redis, node=node)
        await node.webhooks.start()
    from .metrics import Ops

    node.ops = Ops(node)
    node.ops.start()
    if redis is not None:
        from .cluster import Cluster
        from .redisconn import redis_prefix

        node.cluster = Cluster(node, redis, node.bus, redis_prefix(cfg))
    _core.configure(node, loop, max_header=cfg.max_header_size, max_body=cfg.max_body_size,
                    max_frame=cfg.max_message_size, max_outbound=cfg.max_outbound_buffer)
    await node.bus.start(node)
    if node.cluster is not None:
        await node.cluster.start()
    return node


def install_signals(cfg: Config, stop: asyncio.Event, supervised: bool) -> None:
    """SIGTERM/SIGINT drain (a second one exits at once); SIGHUP reloads when unsupervised."""
    loop = asyncio.get_running_loop()
    received = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        if len(received) > 1:
            log.warning("second signal, exiting without draining")
            os._exit(1)
        log.info("signal received, draining", extra={"signal": signal.Signals(sig).name})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if not supervised:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload(cfg, stop)))
        write_pid_file(cfg)


async def close_node(node: Node, deadline: float) -> None:
    """After the sockets are gone: webhooks to their outbox, then the audit flushed (nothing
    accepted is lost on a clean stop), all within shutdown_timeout."""
    loop = asyncio.get_running_loop()
    cfg = node.cfg
    if node.webhooks is not None:
        # edges recorded so far (delayed ones too) go to the durable outbox; a short grace
        # lets the sender deliver them, what is left goes out after the next start
        try:
            await asyncio.wait_for(node.webhooks.close(grace=min(2.0, cfg.shutdown_timeout / 4)), 5.0)
        except Exception as e:
            log.error("webhooks did not stop cleanly", extra={"error": repr(e)})
    if node.ops is not None:
        await node.ops.stop()
    if node.intake.observers is not None:
        await node.intake.observers.close()
    if node.audit is not None:
        try:
            await asyncio.wait_for(node.audit.close(), max(1.0, deadline - loop.time()))
        except TimeoutError:
            log.error("audit flush did not finish within shutdown_timeout",
                      extra={"queued": node.audit.queue_depth})
    if node.redis is not None:
        await node.redis.aclose()


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
    if node.cluster is not None:
        await node.cluster.close()
    await node.bus.close()


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """https and wss straight from fastrelay when tls_cert and tls_key are set."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def start_apps_refresh(cfg: Config, apps: AppManager) -> asyncio.Task | None:
    """apps_source = "postgres": load the apps table now, then again every refresh interval."""
    if cfg.apps_source != "postgres":
        return None
    from .apps import PostgresApps

    store = PostgresApps(cfg.apps_database_url or cfg.database_url, cfg.apps_table)
    apps.replace(cfg.apps + await store.load())  # config/env apps stay alongside

    async def refresh() -> None:
        while True:
            await asyncio.sleep(cfg.apps_refresh_interval)
            try:
                apps.replace(cfg.apps + await store.load())
            except Exception as e:  # keep the cached set while PostgreSQL is away
                log.warning("apps refresh failed, keeping the cached apps", extra={"error": repr(e)})

    return asyncio.get_running_loop().create_task(refresh())


def pid_file(cfg: Config) -> Path:
    return Path(cfg.data_dir) / "fastrelay.pid"


def write_pid_file(cfg: Config) -> None:
    path = pid_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def remove_pid_file(cfg: Config) -> None:
    path = pid_file(cfg)
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def tell_ready() -> None:
    """Tells the process that started us for a reload that we are listening."""
    fd = os.environ.pop("FASTRELAY_READY_FD", None)
    if fd is not None:
        try:
            os.write(int(fd), b"ready\n")
            os.close(int(fd))
        except OSError:
            pass


async def reload(cfg: Config, stop: asyncio.Event, timeout: float = 30.0) -> bool:
    """SIGHUP / `fastrelay reload` without a supervisor: start a new server process with the
    same command line; it binds the same port (SO_REUSEPORT) and loads the config afresh.
    Once it says it is listening, this one drains (4200 to its clients, who reconnect to the
    new one) and exits. If the new one fails to start, this one keeps serving."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    env = {**os.environ, "FASTRELAY_READY_FD": str(w)}
    log.info("reload: starting a new server process")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fastrelay", *sys.argv[1:]], env=env,
                                pass_fds=(w,), start_new_session=True)
    except OSError as e:
        os.close(r)
        os.close(w)
        log.error("reload: could not start a new process", extra={"error": repr(e)})
        return False
    os.close(w)
    try:
        data = await asyncio.wait_for(loop.run_in_executor(None, os.read, r, 16), timeout)
    except TimeoutError:
        data = b""
    finally:
        os.close(r)
    if not data.startswith(b"ready"):
        log.error("reload: the new process did not come up; still serving",
                  extra={"pid": proc.pid, "exit": proc.poll()})
        if proc.poll() is None:
            proc.terminate()
        return False
    log.info("reload: new process listening, draining this one", extra={"pid": proc.pid})
    stop.set()
    return True
