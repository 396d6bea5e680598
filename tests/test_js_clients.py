"""Real-client integration tests: pusher-js 8 and Laravel Echo 2 (Node) against the server.

Each test runs one scenario script from tests/js/scenarios/ with `node`, talks to it over a JSON
line protocol (see tests/js/lib.mjs) and asserts exact outcomes. Every signature the clients
use (private/presence channel auth, user sign-in, encrypted-channel shared secrets) is made by
the official `pusher` Python SDK inside a small HTTP auth server that this module runs on
127.0.0.1; pusher-js reaches it with its own 'ajax' transport (its Node build ships an
XMLHttpRequest implementation). Server-side actions (trigger, send_to_user, HTTP API queries)
also go through the SDK.

Needs `node` (>= 20) and the packages of tests/js (installed with `npm ci` on first use).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pusher
import pytest

JS_DIR = Path(__file__).resolve().parent / "js"
SCENARIOS = JS_DIR / "scenarios"
STEP_TIMEOUT = 10.0  # seconds to wait for any one line from a scenario
ENCRYPTION_MASTER_KEY = base64.b64encode(os.urandom(32)).decode()


def uid() -> str:
    return uuid.uuid4().hex[:12]


def user_info(user_id: str) -> dict[str, Any]:
    return {"id": user_id, "name": f"User {user_id.title()}"}


# ---- node + packages --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_env() -> str:
    """Path of `node`, with tests/js/node_modules installed (npm ci) when missing."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm not installed")
    if not (JS_DIR / "node_modules" / "pusher-js").is_dir() or not (
        JS_DIR / "node_modules" / "laravel-echo"
    ).is_dir():
        cmd = "ci" if (JS_DIR / "package-lock.json").exists() else "install"
        r = subprocess.run(
            [npm, cmd, "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR, capture_output=True, text=True, timeout=300,
        )
        if r.returncode != 0:
            pytest.fail(f"npm {cmd} in {JS_DIR} failed:\n{r.stdout}\n{r.stderr}")
    return node


# ---- the auth endpoint (signatures by the Python SDK) ------------------------------------------


class AuthServer:
    """Channel authorization (/auth) and user authentication (/user-auth) endpoints.

    The user is chosen by the client with `?user_id=` in the endpoint URL. Channels whose name
    contains "badauth" get a signature made with a wrong secret (still by the SDK).
    """

    def __init__(self, relay: Any) -> None:
        self.sdk = make_sdk(relay)
        self.encrypted_sdk = encrypted_client(relay)
        self.wrong_sdk = make_sdk(relay, secret="not-the-secret")
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                form = {k: v[0] for k, v in parse_qs(body).items()}
                try:
                    status, payload = server.handle(url.path, query, form)
                except Exception as e:  # the client sees a 500 and reports an auth error
                    status, payload = 500, {"error": repr(e)}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, path: str, query: dict[str, str], form: dict[str, str]) -> tuple[int, dict]:
        user_id = query.get("user_id", "")
        socket_id = form.get("socket_id", "")
        with self.lock:
            self.requests.append({"path": path, "user_id": user_id, **form})
        if path == "/auth":
            channel = form["channel_name"]
            sdk = self.sdk
            if "badauth" in channel:
                sdk = self.wrong_sdk
            elif channel.startswith("private-encrypted-"):
                sdk = self.encrypted_sdk
            custom = None
            if channel.startswith("presence-"):
                if not user_id:
                    return 403, {"error": "presence needs ?user_id="}
                custom = {"user_id": user_id, "user_info": user_info(user_id)}
            auth = sdk.authenticate(channel=channel, socket_id=socket_id, custom_data=custom)
            if isinstance(auth.get("shared_secret"), bytes):
                auth["shared_secret"] = auth["shared_secret"].decode()
            return 200, auth
        if path == "/user-auth":
            if not user_id:
                return 403, {"error": "sign-in needs ?user_id="}
            return 200, self.sdk.authenticate_user(
                socket_id, {"id": user_id, "user_info": user_info(user_id)})
        return 404, {"error": f"no endpoint {path}"}

    def requests_for(self, channel: str) -> list[dict[str, str]]:
        with self.lock:
            return [r for r in self.requests if r.get("channel_name") == channel]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_sdk(relay: Any, secret: str | None = None, **options: Any) -> pusher.Pusher:
    """The official Python SDK pointed at the server (what relay.pusher() would return).

    The SDK only accepts numeric app ids (pusher.util.app_id_re = [0-9]+), but the fixture's
    apps are "test-app" (fastrelay) and "app1" (Soketi). For those the client is built with a
    placeholder id and the real one is set afterwards; it is only used in the /apps/<id>/ paths.
    """
    numeric = relay.app_id.isdigit()
    client = pusher.Pusher(
        app_id=relay.app_id if numeric else "1", key=relay.key,
        secret=secret or relay.secret, host=relay.host, port=relay.port, ssl=False, **options,
    )
    if not numeric:
        client._pusher_client._app_id = relay.app_id
        client._authentication_client._app_id = relay.app_id
    return client


def encrypted_client(relay: Any) -> pusher.Pusher:
    """The SDK with an encryption master key (for private-encrypted- channels)."""
    return make_sdk(relay, encryption_master_key_base64=ENCRYPTION_MASTER_KEY)


@pytest.fixture(scope="session")
def auth_server(relay: Any) -> Iterator[AuthServer]:
    srv = AuthServer(relay)
    yield srv
    srv.close()


# ---- running scenario scripts -------------------------------------------------------------------


class Scenario:
    """A running `node scenarios/<name>.mjs '<params>'` with its JSON line protocol."""

    def __init__(self, node: str, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [node, str(SCENARIOS / f"{name}.mjs"), json.dumps(params)],
            cwd=JS_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"type": "noise", "text": line}
            self._queue.put(msg)
        self._queue.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _context(self) -> str:
        return (f"scenario {self.name}: lines so far {json.dumps(self.lines)}\n"
                f"stderr: {''.join(self._stderr)[-3000:]}")

    def expect(self, type_: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """The next result line of this type (lines of other types are kept in self.lines)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                msg = self._queue.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no {type_!r} line within {timeout}s; {self._context()}") \
                    from None
            if msg is None:
                self._queue.put(None)
                raise AssertionError(f"exited before a {type_!r} line; {self._context()}")
            self.lines.append(msg)
            if msg["type"] == "error":
                raise AssertionError(f"scenario failed: {msg['message']}\n{self._context()}")
            if msg["type"] == type_:
                return msg

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        done = self.expect("done", timeout)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit after done; {self._context()}") from None
        assert rc == 0, f"exit code {rc}; {self._context()}"
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def scenario(node_env: str, relay: Any, auth_server: AuthServer) -> Iterator[Any]:
    """Factory: scenario(name, **params) starts a script with the connection parameters."""
    started: list[Scenario] = []

    def start(name: str, **params: Any) -> Scenario:
        base = {"host": relay.host, "port": relay.port, "key": relay.key, "auth": auth_server.url}
        s = Scenario(node_env, name, {**base, **params})
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


# ---- 1. public channel --------------------------------------------------------------------------


def test_public_channel_receives_triggered_event(scenario: Any, relay: Any) -> None:
    channel, event = f"public-{uid()}", "price-update"
    data = {"symbol": "ACME", "price": 12.5, "tags": ["a", "b"], "note": "héllo ✓", "n": None}
    s = scenario("public", channel=channel, event=event)
    s.expect("ready")
    make_sdk(relay).trigger(channel, event, data)
    got = s.expect("event")
    assert got["channel"] == channel
    assert got["data"] == data
    s.finish()


# ---- 2. private channel + bad auth ------------------------------------------------------------


def test_private_channel_auth_and_bad_signature(
    scenario: Any, relay: Any, auth_server: AuthServer
) -> None:
    channel, bad_channel, event = f"private-{uid()}", f"private-badauth-{uid()}", "secret-news"
    s = scenario("private", channel=channel, bad_channel=bad_channel, event=event)
    ready = s.expect("ready")
    socket_id = ready["socket_id"]
    # pusher-js asked our endpoint, with its socket id, for exactly this channel
    assert [r["socket_id"] for r in auth_server.requests_for(channel)] == [socket_id]

    make_sdk(relay).trigger(channel, event, {"n": 1})
    assert s.expect("event")["data"] == {"n": 1}

    bad = s.expect("bad_subscription")
    assert "succeeded" not in bad, f"subscription with a wrong signature succeeded: {bad}"
    assert "pusher_error" not in bad, (
        f"server answered with a connection-level pusher:error, not a channel-scoped "
        f"pusher:subscription_error: {bad}")
    assert isinstance(bad["error"], dict) and bad["error"], bad
    assert bad["subscribed"] is False
    assert bad["state"] == "connected"
    assert bad["socket_id"] == socket_id
    assert [r["socket_id"] for r in auth_server.requests_for(bad_channel)] == [socket_id]

    s.expect("ready_again")
    make_sdk(relay).trigger(channel, event, {"n": 2})
    assert s.expect("event")["data"] == {"n": 2}
    done = s.finish()
    assert done["state"] == "connected" and done["socket_id"] == socket_id
    assert "disconnected" not in done["states"], done["states"]


# ---- 3. presence --------------------------------------------------------------------------------


def test_presence_members_and_http_api(scenario: Any, relay: Any) -> None:
    channel = f"presence-{uid()}"
    sdk = make_sdk(relay)
    s = scenario("presence", channel=channel)

    a = s.expect("alice_subscribed")
    assert a["count"] == 1
    assert a["members"] == {"alice": user_info("alice")}
    assert a["me"] == {"id": "alice", "info": user_info("alice")}

    b = s.expect("bob_subscribed")
    assert b["count"] == 2
    assert b["members"] == {"alice": user_info("alice"), "bob": user_info("bob")}
    assert b["me"] == {"id": "bob", "info": user_info("bob")}

    added = s.expect("member_added")
    assert added["member"] == {"id": "bob", "info": user_info("bob")}
    assert added["count"] == 2

    users = sdk.users_info(channel)
    assert sorted(u["id"] for u in users["users"]) == ["alice", "bob"]
    info = sdk.channel_info(channel, ["user_count"])
    assert info["occupied"] is True
    assert info["user_count"] == 2
    listed = sdk.channels_info(prefix_filter="presence-", attributes=["user_count"])

    s.send("leave")
    removed = s.expect("member_removed")
    assert removed["member"] == {"id": "bob", "info": user_info("bob")}
    assert removed["count"] == 1
    assert [u["id"] for u in sdk.users_info(channel)["users"]] == ["alice"]
    assert sdk.channel_info(channel, ["user_count"])["user_count"] == 1
    s.send("finish")
    s.finish()
    # GET /channels?filter_by_prefix=presence-&info=user_count (checked last: Soketi 1.6
    # ignores info= here and returns subscription_count/occupied instead of user_count)
    assert listed["channels"][channel].get("user_count") == 2, listed["channels"][channel]


# ---- 4. client events ---------------------------------------------------------------------------


def test_client_events_private_and_presence(scenario: Any) -> None:
    payload = {"text": "typing…", "at": 1234567890, "nested": {"ok": True}}
    s = scenario("client_events", private_channel=f"private-chat-{uid()}",
                 presence_channel=f"presence-chat-{uid()}", payload=payload)

    for kind in ("private", "presence"):
        r = s.expect(kind)
        assert r["accepted"] is True, r
        assert r["data"] == payload, r
        assert r["ack"] == {"ok": True}, r
        client_events_at_sender = [e for e in r["sender_events"] if e.startswith("client-")]
        assert client_events_at_sender == ["client-ack"], f"sender got its own event back: {r}"
        assert [e for e in r["receiver_events"] if e.startswith("client-")] == ["client-typing"]
        if kind == "presence":
            assert r["metadata"] == {"user_id": "alice"}, r
            assert r["ack_metadata"] == {"user_id": "bob"}, r
        else:
            assert not (r["metadata"] or {}).get("user_id"), r
    s.finish()


# ---- 5. sign-in + send_to_user ------------------------------------------------------------------


def test_signin_and_send_to_user(scenario: Any, relay: Any) -> None:
    user_id, event = f"carol-{uid()}", "direct-message"
    s = scenario("signin", user_id=user_id, event=event)
    ready = s.expect("ready")
    assert ready["user_data"] == {"id": user_id, "user_info": user_info(user_id)}
    assert json.loads(ready["signin_success"]["user_data"]) == ready["user_data"]
    assert ready["server_to_user_channel"] == f"#server-to-user-{user_id}"

    data = {"text": "hello carol", "id": 7}
    make_sdk(relay).send_to_user(user_id, event, data)
    assert s.expect("event")["data"] == data
    s.finish()


# ---- 6. Laravel Echo ----------------------------------------------------------------------------


@pytest.mark.parametrize("broadcaster", ["pusher", "reverb"])
def test_laravel_echo(scenario: Any, relay: Any, broadcaster: str) -> None:
    private_name, presence_name = f"tenant.{uid()}", f"room.{uid()}"
    whisper = {"typing": True, "who": "alice"}
    s = scenario("echo", broadcaster=broadcaster, private_name=private_name,
                 presence_name=presence_name, whisper=whisper)
    ready = s.expect("ready")
    assert ready["channel"] == f"private-{private_name}"

    sdk = make_sdk(relay)
    paid = {"order_id": 42, "amount": "19.99", "currency": "EUR"}
    shipped = {"order_id": 42, "carrier": "DHL"}
    sdk.trigger(f"private-{private_name}", "order.paid", paid)
    sdk.trigger(f"private-{private_name}", "App\\Events\\OrderShipped", shipped)
    listen = s.expect("listen")
    assert listen["paid"] == paid
    assert listen["shipped"] == shipped

    p = s.expect("presence")
    assert p["here_alice"] == [user_info("alice")]
    assert sorted(p["here_bob"], key=lambda u: u["id"]) == [user_info("alice"), user_info("bob")]
    assert p["joining"] == user_info("bob")
    assert p["leaving"] == user_info("bob")
    assert p["whisper"] == whisper
    s.finish()


# ---- 7. socket_id exclusion ---------------------------------------------------------------------


def test_trigger_excludes_socket_id(scenario: Any, relay: Any) -> None:
    channel = f"excl-{uid()}"
    s = scenario("socket_exclusion", channel=channel)
    ready = s.expect("ready")
    sdk = make_sdk(relay)
    sdk.trigger(channel, "excluded", {"n": 1}, socket_id=ready["alice"])
    sdk.trigger(channel, "marker", {"n": 2})
    logs = s.expect("logs")
    assert logs["alice"] == [{"event": "marker", "data": {"n": 2}}]
    assert logs["bob"] == [
        {"event": "excluded", "data": {"n": 1}},
        {"event": "marker", "data": {"n": 2}},
    ]
    s.finish()


# ---- 8. private-encrypted -----------------------------------------------------------------------


def test_private_encrypted_channel(scenario: Any, relay: Any, auth_server: AuthServer) -> None:
    channel, event = f"private-encrypted-{uid()}", "sealed"
    data = {"card": "4111", "secret": "only for you"}
    s = scenario("encrypted", channel=channel, event=event)
    s.expect("ready")
    encrypted_client(relay).trigger(channel, event, data)
    got = s.expect("event")
    assert got["data"] == data
    # the wire carried ciphertext only
    assert len(got["raw"]) == 1
    wire = got["raw"][0]["data"]
    wire = json.loads(wire) if isinstance(wire, str) else wire
    assert set(wire) == {"nonce", "ciphertext"}
    assert "only for you" not in json.dumps(got["raw"])
    s.finish()


# ---- 9. cache channels --------------------------------------------------------------------------


def test_cache_channel_last_event_and_cache_miss(scenario: Any, relay: Any) -> None:
    channel, empty, event = f"cache-{uid()}", f"cache-{uid()}", "status"
    sdk = make_sdk(relay)
    sdk.trigger(channel, event, {"v": 1})
    sdk.trigger(channel, event, {"v": 2})
    s = scenario("cache", channel=channel, empty_channel=empty, event=event)
    cached = s.expect("cached")["log"]
    assert [e["event"] for e in cached] == ["pusher:subscription_succeeded", event]
    assert cached[-1]["data"] == {"v": 2}
    miss = s.expect("empty")["log"]
    assert [e["event"] for e in miss] == ["pusher:subscription_succeeded", "pusher:cache_miss"]
    s.finish()
