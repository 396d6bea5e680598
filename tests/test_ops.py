"""Operations end to end against real server processes: /metrics, /ready, graceful shutdown on
SIGTERM, reload (SIGHUP) with no gap, apps from PostgreSQL with refresh, and TLS (https/wss)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest
from conftest import ROOT, free_port
from prometheus_client.parser import text_string_to_metric_families
from wsclient import api, connect, http, open_ws

from fastrelay.signatures import sign_api_request

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def get(url: str, timeout: float = 5, context: Any = None) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "worker")))] = s.value
    return out


def scrape(relay: Any, url: str | None = None) -> dict[tuple[str, tuple], float]:
    status, body, headers = get(url or relay.http_url + "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(body.decode())


def cli(relay: Any, *args: str, timeout: float = 30,
        extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastrelay", *args], env={**relay.env, **(extra or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------- metrics


def test_metrics_count_connections_deliveries_latency_and_requests(fresh_relay: Any) -> None:
    relay = fresh_relay()
    ch = f"m-{uuid.uuid4().hex[:8]}"
    subs = [connect(relay) for _ in range(3)]
    for ws in subs:
        ws.subscribe(ch)
    relay.pusher().trigger(ch, "ev", "hello-data")
    for ws in subs:
        assert ws.expect("ev", ch)["data"] == "hello-data"
    # a refused connection is counted by its close code
    bad = open_ws(relay, key="no-such-key")
    bad.expect_error_close(4001)
    bad.close()
    subs[0].send_json("pusher:ping")
    subs[0].expect("pusher:pong")
    # answered later from a task (channel counts), and refused there: counted with the
    # status actually sent
    p = relay.pusher()
    assert ch in p.channels_info()["channels"]
    with pytest.raises(Exception):  # noqa: B017 (the SDK raises its own error type)
        p.channels_info(attributes=["user_count"])  # 400: needs filter_by_prefix=presence-
    q = sign_api_request(relay.key, relay.secret, "POST", "/api/events/nope/replay")
    req = urllib.request.Request(f"{relay.http_url}/api/events/nope/replay?{urlencode(q)}",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 404  # from a task, after the audit lookup

    for _ in range(2):  # /ready answers from a task too
        with urllib.request.urlopen(f"{relay.http_url}/ready", timeout=5) as r:
            assert r.status == 200

    m = scrape(relay)
    assert m[("fastrelay_http_requests_total", (("route", "ready"), ("status", "200")))] == 2
    assert m[("fastrelay_http_requests_total", (("route", "intake:replay"), ("status", "404")))] == 1
    assert m[("fastrelay_http_requests_total", (("route", "pusher:channels"), ("status", "200")))] == 1
    assert m[("fastrelay_http_requests_total", (("route", "pusher:channels"), ("status", "400")))] == 1
    app = (("app", relay.app_id),)
    assert m[("fastrelay_connections", app)] == 3
    assert m[("fastrelay_subscriptions", app)] == 3
    assert m[("fastrelay_channels", app)] == 1
    assert m[("fastrelay_websockets", ())] == 3
    assert m[("fastrelay_deliveries_total", ())] == 3
    assert m[("fastrelay_events_published_total", ())] == 1
    assert m[("fastrelay_delivered_data_bytes_total", ())] == 3 * len("hello-data")
    assert m[("fastrelay_connections_opened_total", ())] == 3
    assert m[("fastrelay_connections_closed_total", (("code", "4001"),))] == 1
    assert m[("fastrelay_messages_received_total", ())] >= 4  # 3 subscribes and a ping
    assert m[("fastrelay_delivery_latency_seconds_count", ())] == 1
    assert 0 <= m[("fastrelay_delivery_latency_seconds_sum", ())] < 1
    assert m[("fastrelay_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == 1
    assert m[("fastrelay_http_requests_total", (("route", "pusher:events"), ("status", "200")))] == 1
    assert m[("fastrelay_http_requests_total", (("route", "websocket"), ("status", "101")))] == 4
    assert m[("fastrelay_audit_queue_depth", ())] >= 0
    assert ("fastrelay_audit_write_seconds_count", ()) in m
    assert ("fastrelay_bus_reconnects_total", ()) in m
    assert ("fastrelay_webhook_failures_total", ()) in m
    assert m[("process_open_fds", ())] > 0
    assert m[("fastrelay_rate_limited_total", ())] == 0
    for ws in subs:
        ws.close()


def test_every_ending_of_the_trigger_route_is_answered_and_counted_once(fresh_relay: Any) -> None:
    """POST /apps/{id}/events runs compiled (_core.on_request); its rare endings go back to
    HttpApi: each is answered as before and counted once, with the status sent."""
    relay = fresh_relay()
    ch = f"m-{uuid.uuid4().hex[:8]}"
    path = f"/apps/{relay.app_id}/events"
    ok = api(relay, "POST", path, {"name": "e", "channel": ch, "data": "x"})
    assert (ok.status, ok.json()) == (200, {})
    later = api(relay, "POST", path, {"name": "e", "channel": ch, "data": "x",
                                      "info": "subscription_count"})  # answered from a task
    assert (later.status, later.json()) == (200, {"channels": {ch: {"subscription_count": 0}}})
    bad_body = api(relay, "POST", path, b"[1]")
    assert (bad_body.status, "error" in bad_body.json()) == (400, True)
    unsigned = http(relay, "POST", path, b"{}")
    assert (unsigned.status, "error" in unsigned.json()) == (401, True)
    unknown = api(relay, "POST", "/apps/no-such-app/events", {"name": "e", "channel": ch, "data": "x"})
    assert (unknown.status, unknown.json()) == (404, {"error": "unknown app"})
    wrong_method = api(relay, "GET", path)
    assert wrong_method.status == 405
    m = scrape(relay)
    for status, n in (("200", 2), ("400", 1), ("401", 1), ("404", 1), ("405", 1)):
        key = ("fastrelay_http_requests_total", (("route", "pusher:events"), ("status", status)))
        assert m[key] == n, (status, m.get(key))


def test_rate_limit_rejections_are_counted(fresh_relay: Any) -> None:
    relay = fresh_relay({"FASTRELAY_APP_RATE_LIMIT": "1", "FASTRELAY_APP_RATE_BURST": "1"})
    p = relay.pusher()
    p.trigger("rl", "e", "x")
    with pytest.raises(Exception):  # noqa: B017 (the SDK raises its own error type on 429)
        p.trigger("rl", "e", "x")
    m = scrape(relay)
    assert m[("fastrelay_rate_limited_total", ())] == 1
    assert m[("fastrelay_http_requests_total", (("route", "pusher:events"), ("status", "429")))] == 1


def test_metrics_port_serves_metrics_and_health_only(fresh_relay: Any) -> None:
    mport = free_port()
    relay = fresh_relay({"FASTRELAY_METRICS_PORT": str(mport)})
    assert get(relay.http_url + "/metrics")[0] == 404  # not on the public port any more
    m = scrape(relay, f"http://127.0.0.1:{mport}/metrics")
    assert ("fastrelay_deliveries_total", ()) in m
    assert get(f"http://127.0.0.1:{mport}/up")[0] == 200
    status, body, _ = get(f"http://127.0.0.1:{mport}/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    assert get(f"http://127.0.0.1:{mport}/apps/x/events")[0] == 404


# ---------------------------------------------------------------------------- health


def test_ready_checks_redis_and_postgresql(fresh_relay: Any) -> None:
    relay = fresh_relay({"FASTRELAY_DATABASE_URL": PG_URL})
    assert get(relay.http_url + "/up")[0] == 200
    status, body, _ = get(relay.http_url + "/ready")
    assert status == 200, body
    assert json.loads(body) == {"ready": True}


def test_ready_is_503_with_a_reason_when_postgresql_is_down(fresh_relay: Any) -> None:
    # the audit starts anyway (it spills to disk), but the node is not ready
    relay = fresh_relay({"FASTRELAY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/test"})
    assert get(relay.http_url + "/up")[0] == 200
    status, body, headers = get(relay.http_url + "/ready")
    assert status == 503
    answer = json.loads(body)
    assert answer["ready"] is False
    assert "postgresql" in answer["checks"] and "unreachable" in answer["reason"]
    assert headers.get("Retry-After") == "1"
    assert "postgres@" not in body.decode()  # no URLs (and so no passwords) in the answer


# ---------------------------------------------------------------------------- shutdown


def test_sigterm_drains_with_4200_flushes_the_audit_and_exits(fresh_relay: Any, tmp_path: Path) -> None:
    relay = fresh_relay({"FASTRELAY_SHUTDOWN_TIMEOUT": "4"})
    ws = connect(relay)
    ws.subscribe("drain")
    p = relay.pusher()
    for i in range(50):
        p.trigger("drain", "e", str(i))
    for _ in range(50):
        ws.expect("e", "drain")
    t0 = time.monotonic()
    relay.proc.send_signal(signal.SIGTERM)
    ws.expect_error_close(4200, timeout=5)
    ws.close()
    assert relay.proc.wait(10) == 0
    took = time.monotonic() - t0
    assert took < 4 + 2, took
    # not accepting any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()
    import sqlite3

    db = sqlite3.connect(str(tmp_path / "audit.sqlite3"))
    assert db.execute("SELECT count(*) FROM audit_events WHERE name = 'e'").fetchone()[0] == 50
    log = relay.log()
    assert "draining" in log and "stopped" in log


def test_draining_refuses_new_api_calls_with_503(fresh_relay: Any) -> None:
    """Between SIGTERM and exit, a keep-alive connection that was already open gets 503."""
    relay = fresh_relay({"FASTRELAY_SHUTDOWN_TIMEOUT": "4"})
    ws = connect(relay)  # keeps the drain busy for closing_timeout
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=3)
    relay.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(4096)
    except OSError:
        data = b""
    # either the connection was closed by the drain, or the answer is 503: never a 200
    assert b" 200 " not in data.split(b"\r\n", 1)[0]
    s.close()
    ws.close()
    assert relay.proc.wait(10) == 0


# ---------------------------------------------------------------------------- reload


def test_reload_starts_a_new_process_before_the_old_one_drains(fresh_relay: Any, tmp_path: Path) -> None:
    relay = fresh_relay()
    old_pid = relay.proc.pid
    pid_path = tmp_path / "fastrelay.pid"
    assert int(pid_path.read_text()) == old_pid
    failures: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                status, _, _ = get(relay.http_url + "/up", timeout=2)
                if status != 200:
                    failures.append(str(status))
            except OSError as e:
                failures.append(repr(e))
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    ws = connect(relay)
    try:
        r = cli(relay, "reload")
        assert r.returncode == 0, r.stderr
        ws.expect_error_close(4200, timeout=15)  # the old process tells its clients to reconnect
        assert relay.proc.wait(15) == 0
        deadline = time.monotonic() + 5
        while int(pid_path.read_text() or 0) == old_pid and time.monotonic() < deadline:
            time.sleep(0.05)
        new_pid = int(pid_path.read_text())
        assert new_pid != old_pid
        connect(relay).close()  # the new process serves
        time.sleep(0.2)
    finally:
        stop.set()
        t.join()
        ws.close()
        try:
            os.kill(int(pid_path.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    assert failures == [], failures[:5]


# ---------------------------------------------------------------------------- apps in PostgreSQL


def test_apps_from_postgresql_are_created_refreshed_and_rotated(fresh_relay: Any) -> None:
    table = f"apps_test_{uuid.uuid4().hex[:8]}"
    env = {"FASTRELAY_DATABASE_URL": PG_URL, "FASTRELAY_APPS_SOURCE": "postgres",
           "FASTRELAY_APPS_TABLE": table, "FASTRELAY_APPS_REFRESH_INTERVAL": "0.3",
           "FASTRELAY_AUDIT": "false"}
    try:
        relay = fresh_relay(env)
        r = cli(relay, "apps", "create", "--json", "billing")
        assert r.returncode == 0, r.stderr
        app = json.loads(r.stdout)
        assert set(app) == {"id", "key", "secret", "name"} and app["name"] == "billing"
        deadline = time.monotonic() + 5
        while True:  # picked up by the refresh, without a restart
            ws = open_ws(relay, key=app["key"])
            msg = ws.recv()
            ws.close()
            if msg["event"] == "pusher:connection_established":
                break
            assert time.monotonic() < deadline, msg
            time.sleep(0.2)
        listed = cli(relay, "apps", "list", "--json")
        ids = [json.loads(line)["id"] for line in listed.stdout.splitlines()]
        assert app["id"] in ids and relay.app_id in ids
        assert app["secret"] not in listed.stdout  # secrets only with --show-secrets

        import pusher

        def trigger(secret: str) -> None:
            pusher.Pusher(app_id=app["id"], key=app["key"], secret=secret, host=relay.host,
                          port=relay.port, ssl=False).trigger("c", "e", "x")

        trigger(app["secret"])
        r = cli(relay, "apps", "rotate-secret", app["id"])
        assert r.returncode == 0, r.stderr
        new_secret = r.stdout.split()[-1]
        assert new_secret != app["secret"]
        deadline = time.monotonic() + 5
        while True:
            try:
                trigger(app["secret"])
            except Exception:
                break
            assert time.monotonic() < deadline, "old secret still accepted"
            time.sleep(0.2)
        trigger(new_secret)
    finally:
        async def drop() -> None:
            conn = await asyncpg.connect(PG_URL)
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.close()

        import asyncio

        asyncio.run(drop())


# ---------------------------------------------------------------------------- TLS


def make_cert(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_serves_https_and_wss(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTRELAY_", "REVERB_"))}
    env.update({"FASTRELAY_HOST": "127.0.0.1", "FASTRELAY_PORT": str(port), "FASTRELAY_APP_ID": "7",
                "FASTRELAY_APP_KEY": "tls-key", "FASTRELAY_APP_SECRET": "tls-secret",
                "FASTRELAY_DATA_DIR": str(tmp_path), "FASTRELAY_TLS_CERT": str(cert),
                "FASTRELAY_TLS_KEY": str(key)})
    proc = subprocess.Popen([sys.executable, "-m", "fastrelay", "serve"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    ctx = ssl.create_default_context(cafile=str(cert))  # verified against the self-signed cert
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if get(f"https://127.0.0.1:{port}/up", context=ctx)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "TLS server did not come up"
            time.sleep(0.1)
        # plain HTTP on the TLS port is not served
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/up", timeout=2).read()
        # wss: listen via the CLI (picows with TLS), send via the CLI over https
        listen = subprocess.Popen([sys.executable, "-m", "fastrelay", "listen", "--insecure",
                                   "--url", f"https://127.0.0.1:{port}", "--count", "1",
                                   "--timeout", "20", "tls-channel"],
                                  env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        assert "listening on tls-channel" in listen.stderr.readline()
        s = subprocess.run([sys.executable, "-m", "fastrelay", "send", "--insecure", "--url",
                            f"https://127.0.0.1:{port}", "tls-channel", "hello", "world"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=20)
        assert s.returncode == 0, s.stderr
        out, _ = listen.communicate(timeout=20)
        assert json.loads(out.splitlines()[0]) == {"channel": "tls-channel", "event": "hello",
                                                   "data": "world"}
    finally:
        proc.terminate()
        proc.wait(10)
