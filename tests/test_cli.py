"""The `fastrelay` command for humans, run as a subprocess against real servers: send and
listen (public, private and presence, auth signed locally), apps in a TOML file, doctor, and
the error messages when something is wrong."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from conftest import ROOT, free_port


def run(env: dict, *args: str, timeout: float = 30, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastrelay", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def listen(env: dict, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "fastrelay", "listen", "--timeout", "20", *args],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = p.stderr.readline()
    assert "listening on" in line, line + p.stderr.read()
    return p


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTRELAY_", "REVERB_"))}
    env.update(extra)
    return env


def test_send_and_listen_public(relay: Any) -> None:
    p = listen(relay.env, "--count", "2", "cli-public")
    r = run(relay.env, "send", "cli-public", "greeting", '{"text": "hi"}')
    assert r.returncode == 0, r.stderr
    assert "sent greeting" in r.stderr
    r = run(relay.env, "send", "cli-public", "plain", "just text")
    assert r.returncode == 0, r.stderr
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines == [{"channel": "cli-public", "event": "greeting", "data": {"text": "hi"}},
                     {"channel": "cli-public", "event": "plain", "data": "just text"}]


def test_listen_private_and_presence_sign_auth_locally(relay: Any) -> None:
    p = listen(relay.env, "--count", "1", "private-cli")
    assert run(relay.env, "send", "private-cli", "secret-thing", "1").returncode == 0
    out, _ = p.communicate(timeout=20)
    assert json.loads(out) == {"channel": "private-cli", "event": "secret-thing", "data": 1}

    p = listen(relay.env, "--count", "1", "--user", "ops-bob", "presence-cli")
    users = relay.pusher().users_info("presence-cli")
    assert users == {"users": [{"id": "ops-bob"}]}
    assert run(relay.env, "send", "presence-cli", "hello", "x").returncode == 0
    out, _ = p.communicate(timeout=20)
    assert json.loads(out)["event"] == "hello"


def test_send_explains_what_is_wrong(relay: Any) -> None:
    down = {**relay.env, "FASTRELAY_PORT": str(free_port())}
    r = run(down, "send", "c", "e", "d")
    assert r.returncode == 1
    assert "cannot reach" in r.stderr and "fastrelay serve" in r.stderr
    wrong = {**relay.env, "FASTRELAY_APP_SECRET": "not-the-secret"}
    r = run(wrong, "send", "c", "e", "d")
    assert r.returncode == 1 and "401" in r.stderr and "secret" in r.stderr
    assert "not-the-secret" not in r.stderr and relay.secret not in r.stderr
    r = run(clean_env(FASTRELAY_DATA_DIR="/nonexistent-dir"), "send", "c", "e", "d")
    assert r.returncode == 2 and "no app configured" in r.stderr
    r = run({**relay.env, "FASTRELAY_PORT": "notaport"}, "send", "c", "e", "d")
    assert r.returncode == 2 and "port" in r.stderr


def test_apps_create_list_rotate_in_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "fastrelay.toml"
    cfg.write_text('port = 6001\n\n[[apps]]\nid = "1"\nkey = "first"\nsecret = "first-secret"\n')
    env = clean_env(FASTRELAY_DATA_DIR=str(tmp_path))
    r = run(env, "apps", "create", "--config", str(cfg), "shop")
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(":", 1) for line in r.stdout.strip().splitlines())
    app_id, key, secret = (fields[k].strip() for k in ("app id", "app key", "app secret"))
    apps = tomllib.loads(cfg.read_text())["apps"]
    assert {"id": app_id, "key": key, "secret": secret, "name": "shop"} in apps
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"

    r = run(env, "apps", "list", "--config", str(cfg))
    assert r.returncode == 0 and app_id in r.stdout and key in r.stdout
    assert secret not in r.stdout and "first-secret" not in r.stdout
    assert secret in run(env, "apps", "list", "--config", str(cfg), "--show-secrets").stdout

    r = run(env, "apps", "rotate-secret", "--config", str(cfg), app_id)
    assert r.returncode == 0, r.stderr
    new = r.stdout.split()[-1]
    apps = {a["id"]: a for a in tomllib.loads(cfg.read_text())["apps"]}
    assert apps[app_id]["secret"] == new != secret
    assert apps["1"]["secret"] == "first-secret"  # the others are untouched
    r = run(env, "apps", "rotate-secret", "--config", str(cfg), "404")
    assert r.returncode == 1 and "no [[apps]] table with id '404'" in r.stderr


def test_doctor_passes_on_a_good_setup_and_names_fixes(tmp_path: Path, relay: Any) -> None:
    good = clean_env(FASTRELAY_DATA_DIR=str(tmp_path), FASTRELAY_HOST="127.0.0.1",
                     FASTRELAY_PORT=str(free_port()), FASTRELAY_REDIS_URL="redis://127.0.0.1:6379",
                     FASTRELAY_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/test",
                     FASTRELAY_APP_ID="1", FASTRELAY_APP_KEY="k", FASTRELAY_APP_SECRET="s" * 32)
    r = run(good, "doctor", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Redis" in r.stdout and "PostgreSQL" in r.stdout and "open files limit" in r.stdout
    assert "0 problem(s)" in r.stdout

    # a running fastrelay on the port is fine; another program is not
    r = run({**good, "FASTRELAY_PORT": str(relay.port)}, "doctor", cwd=tmp_path)
    assert "a fastrelay is already listening" in r.stdout
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = run({**good, "FASTRELAY_PORT": str(port),
                 "FASTRELAY_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}",
                 "FASTRELAY_DATABASE_URL": f"postgresql://u:hunter2@127.0.0.1:{free_port()}/x"},
                "doctor", cwd=tmp_path, timeout=60)
    assert r.returncode == 1
    assert f"port 127.0.0.1:{port} is in use by another program" in r.stdout
    assert "Redis at" in r.stdout and "unreachable" in r.stdout
    assert "fix: start Redis, or correct redis_url" in r.stdout
    assert "PostgreSQL (database_url)" in r.stdout
    assert "hunter2" not in r.stdout  # passwords are masked
    r = run({**good, "FASTRELAY_LOG_FORMAT": "xml"}, "doctor", cwd=tmp_path)
    assert r.returncode == 1 and "log_format" in r.stdout and "fix:" in r.stdout


def test_events_tail_and_replay(relay: Any) -> None:
    import time
    import uuid

    channel = f"cli-audit-{uuid.uuid4().hex[:8]}"
    p = listen(relay.env, "--count", "2", channel)
    assert run(relay.env, "send", channel, "audited", '{"n": 1}').returncode == 0
    rows: list[dict] = []
    for _ in range(50):  # the audit writes in batches
        r = run(relay.env, "events", "tail", "--no-follow", "--channel", channel)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in r.stdout.splitlines()]
        if rows:
            break
        time.sleep(0.1)
    assert [(e["name"], e["channels"], e["source"]) for e in rows] == [("audited", [channel], "api")]
    r = run(relay.env, "events", "replay", rows[0]["id"])
    assert r.returncode == 0 and f"replayed {rows[0]['id']}" in r.stderr, r.stderr
    out, _ = p.communicate(timeout=20)
    assert [json.loads(x)["event"] for x in out.splitlines()] == ["audited", "audited"]
    r = run(relay.env, "events", "replay", "no-such-id")
    assert r.returncode == 1 and "404" in r.stderr
