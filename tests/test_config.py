"""Configuration: TOML, FASTRELAY_* and Reverb's variables, helpful errors, the dev app."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_up

from fastrelay.config import ConfigError, load


def test_toml_then_env(tmp_path: Path) -> None:
    path = tmp_path / "fastrelay.toml"
    path.write_text('port = 7000\nworkers = 2\nredis_url = "redis://127.0.0.1:6379"\n'
                    '[[apps]]\nid = "1"\nkey = "k1"\nsecret = "s1"\nclient_events = false\n'
                    'allowed_origins = ["https://example.com"]\n')
    cfg = load(str(path), env={"FASTRELAY_PORT": "7001"})
    assert cfg.port == 7001 and cfg.workers == 2
    [app] = cfg.apps
    assert (app.id, app.key, app.secret, app.client_events) == ("1", "k1", "s1", False)
    assert app.allowed_origins == ["https://example.com"]
    assert app.origin_allowed("https://example.com") and not app.origin_allowed("https://evil.com")


def test_reverb_variables_switch_over_unchanged() -> None:
    cfg = load(None, env={"REVERB_APP_ID": "123", "REVERB_APP_KEY": "rk", "REVERB_APP_SECRET": "rs",
                          "REVERB_HOST": "localhost", "REVERB_PORT": "8080"})
    assert cfg.port == 8080 and cfg.host == "127.0.0.1"
    assert [(a.id, a.key, a.secret) for a in cfg.apps] == [("123", "rk", "rs")]
    # a public host name is what clients use, not something to bind to
    cfg = load(None, env={"REVERB_APP_KEY": "rk", "REVERB_APP_ID": "1", "REVERB_APP_SECRET": "s",
                          "REVERB_HOST": "ws.example.com"})
    assert cfg.host == "0.0.0.0"


@pytest.mark.parametrize("env, message", [
    ({"FASTRELAY_PORT": "abc"}, "FASTRELAY_port: expected int"),
    ({"FASTRELAY_PORT": "70000"}, "port: 70000 is not a TCP port"),
    ({"FASTRELAY_APP_ID": "1", "FASTRELAY_APP_KEY": "k"}, "FASTRELAY_APP_secret: required"),
    ({"FASTRELAY_APP_ID": "1", "FASTRELAY_APP_KEY": "k", "FASTRELAY_APP_SECRET": "s",
      "FASTRELAY_APP_CLIENT_EVENTS": "maybe"}, "FASTRELAY_APP_client_events: expected bool"),
    ({"FASTRELAY_REDIS_URL": "memcached://x"}, "redis_url: unknown scheme"),
    ({"FASTRELAY_LOG_FORMAT": "xml"}, "log_format"),
])
def test_errors_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(None, env=env)


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('prot = 1\n')
    with pytest.raises(ConfigError, match="prot: unknown setting"):
        load(str(path), env={})


def test_bad_config_stops_the_server_with_the_key(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "fastrelay", "serve"], cwd=tmp_path, capture_output=True,
                       text=True, env={"FASTRELAY_PORT": "nope", "PATH": "/usr/bin:/bin"}, timeout=20)
    assert r.returncode == 2 and "FASTRELAY_port: expected int" in r.stderr


def test_development_app_is_printed_and_kept(tmp_path: Path) -> None:
    def run_once() -> tuple[str, Any]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "serve", "--port", str(port),
                                 "--host", "127.0.0.1"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                                env={"PATH": "/usr/bin:/bin", "FASTRELAY_DATA_DIR": str(tmp_path)})
        try:
            wait_up(f"http://127.0.0.1:{port}", proc)
            lines = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any("app secret" in x for x in lines):
                lines.append(proc.stderr.readline())
            return "".join(lines), proc
        finally:
            proc.terminate()
            proc.wait(10)

    first, _ = run_once()
    second, _ = run_once()
    assert "no app configured" in first and "app key:" in first
    key = [x for x in first.splitlines() if "app key:" in x][0]
    assert key in second  # the same development app after a restart
