"""Several worker processes on one port: each binds its own SO_REUSEPORT socket (the kernel
spreads connections), runs its own uvloop loop, and meets the others on the Redis bus. The
supervisor restarts a worker that dies, forwards SIGTERM/SIGINT, and on SIGHUP starts a new
generation of workers before draining the old one (a restart with no gap in service)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

from .apps import AppManager
from .config import Config

log = logging.getLogger("fastrelay.supervisor")

RESTART_WINDOW = 10.0  # seconds; a worker that dies sooner than this is restarted with back-off


def _exit_with_parent() -> None:
    """If the supervisor is killed outright, its workers drain and exit instead of lingering."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
        self.stopping = False
        self.reload_requested = False
        self.backoff: dict[int, float] = {}

    def spawn(self, slot: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                _exit_with_parent()
                import uvloop

                from .server import serve

                os.environ["FASTRELAY_WORKER"] = str(slot)
                uvloop.run(serve(self.cfg, AppManager(self.cfg.apps)))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.workers[pid] = (slot, time.monotonic())
        log.info("worker started", extra={"pid": pid, "slot": slot})
        return pid

    def signal_all(self, sig: int, pids: list[int] | None = None) -> None:
        for pid in pids if pids is not None else list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def reload(self) -> None:
        """New workers first (they share the port), then the old ones drain and exit."""
        old = list(self.workers)
        for slot in range(self.cfg.workers):
            self.spawn(slot)
        time.sleep(1.0)  # let the new generation bind and connect to the bus
        for pid in old:
            self.workers.pop(pid, None)
        self.signal_all(signal.SIGTERM, old)
        self._reap_quietly(old)
        log.info("reloaded", extra={"workers": self.cfg.workers})

    def _reap_quietly(self, pids: list[int]) -> None:
        deadline = time.monotonic() + 15
        for pid in pids:
            while time.monotonic() < deadline:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for slot in range(self.cfg.workers):
            self.spawn(slot)
        while self.workers:
            if self.reload_requested and not self.stopping:
                self.reload_requested = False
                self.reload()
                continue
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.1)
                continue
            entry = self.workers.pop(pid, None)
            if entry is None or self.stopping:
                continue
            slot, started = entry
            code = os.waitstatus_to_exitcode(status)
            log.warning("worker died; restarting", extra={"pid": pid, "slot": slot, "code": code})
            delay = self.backoff.get(slot, 0.0)
            if time.monotonic() - started < RESTART_WINDOW:
                delay = min(max(delay * 2, 0.1), 5.0)
            else:
                delay = 0.0
            self.backoff[slot] = delay
            time.sleep(delay)
            self.spawn(slot)
        return 0
