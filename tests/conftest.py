"""Shared fixtures: a real fastrelay server process on a free port, driven over real sockets.

Set FASTRELAY_TEST_URL (e.g. "http://127.0.0.1:6001?app_id=app1&key=key1&secret=secret1")
to run the suite against an already running Pusher-compatible server instead (Soketi, say).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pusher
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Relay:
    host: str
    port: int
    app_id: str
    key: str
    secret: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ws_url(self, key: str | None = None) -> str:
        return f"ws://{self.host}:{self.port}/app/{key or self.key}?protocol=7&client=js&version=8.4.0"

    def pusher(self) -> pusher.Pusher:
        """The official Pusher Python SDK, pointed at this server."""
        return pusher.Pusher(
            app_id=self.app_id, key=self.key, secret=self.secret,
            host=self.host, port=self.port, ssl=False,
        )

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""


def wait_up(url: str, proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/up", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server at {url} did not come up")


def start_relay(tmp: Path, extra_env: dict[str, str] | None = None,
                args: list[str] | None = None) -> Relay:
    """Starts `python -m fastrelay serve` with one app configured through the environment."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTRELAY_", "REVERB_"))}
    env.update({
        "FASTRELAY_HOST": "127.0.0.1",
        "FASTRELAY_PORT": str(port),
        "FASTRELAY_APP_ID": "100001",
        "FASTRELAY_APP_KEY": "test-key",
        "FASTRELAY_APP_SECRET": "test-secret",
        "FASTRELAY_APP_CLIENT_EVENTS": "true",
        "FASTRELAY_DATA_DIR": str(tmp),
        "FASTRELAY_LOG_LEVEL": "info",
    })
    env.update(extra_env or {})
    log_path = tmp / f"server-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", *(args or [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp),
    )
    relay = Relay("127.0.0.1", port, env["FASTRELAY_APP_ID"], env["FASTRELAY_APP_KEY"],
                  env["FASTRELAY_APP_SECRET"], proc, log_path, env)
    try:
        wait_up(relay.http_url, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise RuntimeError("fastrelay did not start:\n" + relay.log()) from None
    return relay


def stop_relay(relay: Relay) -> None:
    if relay.proc is not None and relay.proc.poll() is None:
        relay.proc.terminate()
        try:
            relay.proc.wait(10)
        except subprocess.TimeoutExpired:
            relay.proc.kill()
            relay.proc.wait()


@pytest.fixture(scope="session")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One server for the session; tests use their own channel names to stay independent."""
    external = os.environ.get("FASTRELAY_TEST_URL")
    if external:
        u = urlparse(external)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        yield Relay(u.hostname or "127.0.0.1", u.port or 6001, q["app_id"], q["key"], q["secret"])
        return
    r = start_relay(tmp_path_factory.mktemp("relay"))
    yield r
    stop_relay(r)


@pytest.fixture
def fresh_relay(tmp_path: Path) -> Iterator[callable]:
    """A factory for servers with their own settings; each is stopped after the test."""
    started: list[Relay] = []

    def make(extra_env: dict[str, str] | None = None, args: list[str] | None = None) -> Relay:
        r = start_relay(tmp_path, extra_env, args)
        started.append(r)
        return r

    yield make
    for r in started:
        stop_relay(r)
