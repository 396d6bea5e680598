"""Webhooks end to end: real servers (fresh_relay), raw WebSocket clients (wsclient), and a real
HTTP receiver in the test process whose answers the tests switch between 200 and 503.

Every POST is checked with the Pusher Python SDK's validate_webhook (key + HMAC signature of
the raw body, and time_ms), the way an app's backend would accept it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import ROOT
from wsclient import connect, join_presence

from fastrelay.signatures import sign_channel

DELAY = 0.5


class Receiver:
    """An HTTP endpoint that records every POST; `status` says what it answers."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = outer.status
                if status == 200:
                    with outer.lock:
                        outer.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, validator: Any = None) -> list[dict]:
        out = []
        with self.lock:
            posts = list(self.posts)
        for headers, body in posts:
            if validator is not None:
                checked = validator.validate_webhook(headers["x-pusher-key"],
                                                     headers["x-pusher-signature"], body.decode())
                assert checked is not None, f"signature rejected by the pusher SDK: {headers}"
            out.extend(json.loads(body)["events"])
        return out

    def wait(self, pred: Any, timeout: float = 5.0, validator: Any = None) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events(validator)
            if pred(evs):
                return evs
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; got {evs}")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def hook_env(url: str, extra: dict[str, str] | None = None, endpoints: list | None = None) -> dict:
    env = {
        "FASTRELAY_APP_WEBHOOKS": json.dumps(endpoints or [{
            "url": url,
            "event_types": ["channel_occupied", "channel_vacated", "member_added", "member_removed",
                            "client_event", "cache_miss"],
            "headers": {"X-Test": "yes"},
        }]),
        "FASTRELAY_WEBHOOK_DELAY": str(DELAY),
        "FASTRELAY_WEBHOOK_FLUSH_INTERVAL": "0.02",
        "FASTRELAY_WEBHOOK_RETRY_BASE": "0.1",
        "FASTRELAY_WEBHOOK_RETRY_MAX": "0.4",
        "FASTRELAY_AUDIT": "false",
    }
    env.update(extra or {})
    return env


def member(relay: Any, channel: str, user_id: str) -> Any:
    """A new connection that has joined a presence channel as user_id."""
    ws = connect(relay)
    join_presence(relay, ws, channel, user_id, {"name": user_id})
    return ws


def names(evs: list[dict], name: str, channel: str | None = None) -> list[dict]:
    return [e for e in evs if e["name"] == name and (channel is None or e["channel"] == channel)]


def uniq() -> str:
    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- single node


def test_occupied_vacated_signed_and_delayed(fresh_relay, receiver):
    relay = fresh_relay(hook_env(receiver.url))
    sdk = relay.pusher()
    ch = f"wh-{uniq()}"
    ws = connect(relay)
    ws.subscribe(ch)
    evs = receiver.wait(lambda e: names(e, "channel_occupied", ch), validator=sdk)
    assert names(evs, "channel_occupied", ch) == [{"name": "channel_occupied", "channel": ch}]
    headers, body = receiver.posts[0]
    assert headers["x-pusher-key"] == relay.key
    assert headers["x-test"] == "yes"
    assert headers["content-type"] == "application/json"
    assert headers["x-pusher-signature"] == hmac.new(relay.secret.encode(), body,
                                                     hashlib.sha256).hexdigest()
    assert abs(json.loads(body)["time_ms"] - time.time() * 1000) < 5000
    # a wrong secret fails validation: the signature really covers the body
    import pusher
    bad = pusher.Pusher(app_id=relay.app_id, key=relay.key, secret="wrong")
    assert bad.validate_webhook(relay.key, headers["x-pusher-signature"], body.decode()) is None

    t0 = time.monotonic()
    ws.send_json("pusher:unsubscribe", {"channel": ch})
    receiver.wait(lambda e: names(e, "channel_vacated", ch), validator=sdk)
    waited = time.monotonic() - t0
    assert DELAY * 0.9 <= waited < DELAY + 1.5, waited
    ws.close()


def test_quick_return_suppresses_both_edges(fresh_relay, receiver):
    relay = fresh_relay(hook_env(receiver.url))
    ch = f"wh-{uniq()}"
    user_ch = f"presence-{uniq()}"
    ws = connect(relay)
    ws.subscribe(ch)
    a = member(relay, user_ch, "u1")
    receiver.wait(lambda e: names(e, "channel_occupied", ch) and names(e, "member_added", user_ch))
    # leave and come back within the delay: neither vacated nor a second occupied
    ws.send_json("pusher:unsubscribe", {"channel": ch})
    a.close()
    time.sleep(0.1)
    ws.subscribe(ch)
    b = member(relay, user_ch, "u1")  # a reconnect: a new socket, the same user
    time.sleep(DELAY + 0.6)
    evs = receiver.events()
    assert len(names(evs, "channel_occupied", ch)) == 1, evs
    assert names(evs, "channel_vacated", ch) == [], evs
    assert len(names(evs, "member_added", user_ch)) == 1, evs
    assert names(evs, "member_removed", user_ch) == [], evs
    # now really leave
    ws.close()
    b.close()
    evs = receiver.wait(lambda e: names(e, "channel_vacated", ch) and names(e, "member_removed", user_ch))
    assert len(names(evs, "channel_vacated", ch)) == 1
    assert len(names(evs, "member_removed", user_ch)) == 1
    # the presence channel's own occupied/vacated edges came too, once each
    assert len(names(evs, "channel_occupied", user_ch)) == 1
    assert len(names(evs, "channel_vacated", user_ch)) == 1


def test_members_client_events_cache_miss_and_filters(fresh_relay, receiver):
    other = Receiver()
    try:
        endpoints = [
            {"url": receiver.url,
             "event_types": ["member_added", "member_removed", "client_event", "cache_miss"]},
            {"url": other.url, "event_types": ["channel_occupied"],
             "filter": {"channel_name_starts_with": "private-", "channel_name_ends_with": "-x"}},
        ]
        relay = fresh_relay(hook_env(receiver.url, endpoints=endpoints))
        sdk = relay.pusher()
        ch = f"presence-{uniq()}"
        a1 = member(relay, ch, "alice")
        a2 = member(relay, ch, "alice")  # second connection of the same user
        b = member(relay, ch, "bob")
        evs = receiver.wait(lambda e: len(names(e, "member_added", ch)) >= 2, validator=sdk)
        assert sorted(e["user_id"] for e in names(evs, "member_added", ch)) == ["alice", "bob"]
        assert names(evs, "member_added", ch)[0] == {"name": "member_added", "channel": ch,
                                                     "user_id": "alice"}
        # client event on a presence channel: data as a JSON string, socket id and user id
        b.send_json({"event": "client-typing", "channel": ch, "data": {"k": 1}})
        evs = receiver.wait(lambda e: names(e, "client_event", ch), validator=sdk)
        assert names(evs, "client_event", ch) == [{
            "name": "client_event", "channel": ch, "event": "client-typing",
            "data": json.dumps({"k": 1}, separators=(",", ":")), "socket_id": b.socket_id,
            "user_id": "bob"}]
        # alice keeps one connection: no member_removed; bob leaves: member_removed after the delay
        a1.close()
        b.close()
        receiver.wait(lambda e: names(e, "member_removed", ch), validator=sdk)
        time.sleep(0.3)
        evs = receiver.events()
        assert [e["user_id"] for e in names(evs, "member_removed", ch)] == ["bob"]
        # cache channel with nothing cached
        cache = f"cache-{uniq()}"
        c = connect(relay)
        c.send_json("pusher:subscribe", {"channel": cache})
        c.expect("pusher_internal:subscription_succeeded", cache)
        c.expect("pusher:cache_miss", cache)
        evs = receiver.wait(lambda e: names(e, "cache_miss", cache), validator=sdk)
        assert names(evs, "cache_miss", cache) == [{"name": "cache_miss", "channel": cache}]
        # the filtered endpoint: occupied only, private-*-x only
        p1, p2 = f"private-{uniq()}-x", f"private-{uniq()}-y"
        for p in (p1, p2):
            c.subscribe(p, sign_channel(relay.key, relay.secret, c.socket_id, p))
        got = other.wait(lambda e: names(e, "channel_occupied", p1), validator=sdk)
        time.sleep(0.2)
        got = other.events()
        assert got == [{"name": "channel_occupied", "channel": p1}], got
        # the first endpoint never got occupied events
        assert names(receiver.events(), "channel_occupied") == []
        for w in (a2, c):
            w.close()
    finally:
        other.close()


def test_endpoint_down_then_back_every_webhook_arrives(fresh_relay, receiver):
    relay = fresh_relay(hook_env(receiver.url))
    receiver.status = 503
    chans = [f"down-{uniq()}-{i}" for i in range(30)]
    ws = connect(relay)
    for ch in chans:
        ws.subscribe(ch)
    time.sleep(1.2)  # several failed attempts with back-off
    assert receiver.events() == []
    receiver.status = 200
    receiver.wait(lambda e: len(names(e, "channel_occupied")) >= 30, validator=relay.pusher())
    time.sleep(0.3)
    counts = Counter(e["channel"] for e in names(receiver.events(), "channel_occupied"))
    assert counts == Counter(chans), counts  # all of them, once each
    assert len(receiver.posts) < 10  # coalesced: a backlog goes out in few POSTs
    ws.close()


def kill9_then_restart(fresh_relay: Any, receiver: Receiver, env: dict, tag: str,
                       wait_timeout: float = 5.0, none_before_restart: bool = False) -> None:
    """10 channel_occupied webhooks, every POST refused, then kill -9 of the server: another
    server started with the same env delivers each of them exactly once."""
    relay = fresh_relay(env)
    receiver.status = 503
    chans = [f"{tag}-{uniq()}-{i}" for i in range(10)]
    ws = connect(relay)
    for ch in chans:
        ws.subscribe(ch)
    time.sleep(0.5)  # recorded and in the outbox; every POST refused so far
    relay.proc.send_signal(signal.SIGKILL)
    relay.proc.wait()
    ws.close()
    receiver.status = 200
    if none_before_restart:
        assert receiver.events() == []
    fresh_relay(env)
    receiver.wait(lambda e: len(names(e, "channel_occupied")) >= 10, timeout=wait_timeout,
                  validator=relay.pusher())
    time.sleep(0.3)
    assert Counter(e["channel"] for e in names(receiver.events(), "channel_occupied")) == Counter(chans)


def test_kill9_pending_webhooks_arrive_after_restart(fresh_relay, receiver):
    # the restarted server has the same data dir: the SQLite outbox is still there
    kill9_then_restart(fresh_relay, receiver, hook_env(receiver.url), "crash",
                       none_before_restart=True)


def test_dead_letters_listed_and_redelivered(fresh_relay, receiver):
    env = hook_env(receiver.url, {"FASTRELAY_WEBHOOK_RETRY_WINDOW": "0.5"})
    relay = fresh_relay(env)
    receiver.status = 503
    ch = f"dead-{uniq()}"
    ws = connect(relay)
    ws.subscribe(ch)
    cli_env = {k: v for k, v in relay.env.items()}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastrelay", "webhooks", *args], env=cli_env,
                              capture_output=True, text=True, timeout=20, cwd=str(ROOT))

    deadline = time.monotonic() + 5
    rows: list[dict] = []
    while time.monotonic() < deadline and not rows:
        time.sleep(0.2)
        out = cli("failed", "--json")
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == 1, rows
    assert json.loads(rows[0]["event"]) == {"name": "channel_occupied", "channel": ch}
    assert "503" in rows[0]["error"]
    receiver.status = 200
    out = cli("redeliver", rows[0]["id"])
    assert out.returncode == 0 and "1 webhook" in out.stderr, out.stderr
    receiver.wait(lambda e: names(e, "channel_occupied", ch), timeout=5, validator=relay.pusher())
    assert cli("failed", "--json").stdout.strip() == ""
    ws.close()


# ---------------------------------------------------------------- cluster (Redis)


def _redis_available() -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
        return True
    except OSError:
        return False


needs_redis = pytest.mark.skipif(not _redis_available(), reason="Redis at 127.0.0.1:6379 needed")


@needs_redis
def test_two_nodes_same_transition_one_webhook(fresh_relay, receiver):
    prefix = f"whtest-{uniq()}"
    env = hook_env(receiver.url, {"FASTRELAY_REDIS_URL": "redis://127.0.0.1:6379/0",
                                  "FASTRELAY_KEY_PREFIX": prefix})
    r1 = fresh_relay(env)
    r2 = fresh_relay(env)
    chans = [f"both-{uniq()}-{i}" for i in range(20)]
    w1, w2 = connect(r1), connect(r2)
    for ch in chans:  # both nodes see each channel become occupied
        w1.subscribe(ch)
        w2.subscribe(ch)
    sdk = r1.pusher()
    receiver.wait(lambda e: len(names(e, "channel_occupied")) >= 20, validator=sdk)
    w1.close()
    w2.close()
    receiver.wait(lambda e: len(names(e, "channel_vacated")) >= 20, validator=sdk)
    time.sleep(DELAY + 0.3)
    evs = receiver.events()
    for kind in ("channel_occupied", "channel_vacated"):
        counts = Counter(e["channel"] for e in names(evs, kind))
        assert counts == Counter(chans), (kind, counts)  # one webhook per transition

    # staggered: node 2 joins well after node 1 (other claim buckets), node 1 leaves first.
    # The cluster's subscription counts say neither is a cluster-wide edge.
    ch = f"stagger-{uniq()}"
    w1 = connect(r1)
    w1.subscribe(ch)
    receiver.wait(lambda e: names(e, "channel_occupied", ch))
    time.sleep(4 * DELAY)
    w2 = connect(r2)
    w2.subscribe(ch)
    time.sleep(0.5)
    w1.close()
    time.sleep(DELAY + 0.8)
    evs = receiver.events()
    assert len(names(evs, "channel_occupied", ch)) == 1, evs
    assert names(evs, "channel_vacated", ch) == [], evs
    w2.close()
    receiver.wait(lambda e: names(e, "channel_vacated", ch))
    time.sleep(0.3)
    assert len(names(receiver.events(), "channel_vacated", ch)) == 1


@needs_redis
def test_redis_outbox_survives_kill9(fresh_relay, receiver):
    prefix = f"whtest-{uniq()}"
    env = hook_env(receiver.url, {"FASTRELAY_REDIS_URL": "redis://127.0.0.1:6379/0",
                                  "FASTRELAY_KEY_PREFIX": prefix,
                                  "FASTRELAY_WEBHOOK_RECLAIM_IDLE": "1",
                                  # one process: SIGKILL must kill the server, not a supervisor
                                  "FASTRELAY_WORKERS": "1"})
    # the restarted server is on another port: another consumer, which takes the entries over
    kill9_then_restart(fresh_relay, receiver, env, "rcrash", wait_timeout=8)


def test_config_rejects_bad_endpoints():
    from fastrelay.config import ConfigError, load

    base = {"FASTRELAY_APP_ID": "1", "FASTRELAY_APP_KEY": "k", "FASTRELAY_APP_SECRET": "s"}
    cfg = load(env={**base, "FASTRELAY_APP_WEBHOOKS": json.dumps([{"url": "http://x/h"}])})
    assert cfg.apps[0].webhooks == [{"url": "http://x/h"}]
    for bad in ([{"url": "ftp://x"}], [{"url": "http://x", "event_types": ["nope"]}],
                [{"url": "http://x", "filter": {"x": 1}}]):
        with pytest.raises(ConfigError):
            load(env={**base, "FASTRELAY_APP_WEBHOOKS": json.dumps(bad)})


if os.environ.get("FASTRELAY_TEST_URL"):
    pytestmark = pytest.mark.skip("webhooks need servers started by the tests")


@needs_redis
def test_dead_node_channels_are_vacated_once(fresh_relay, receiver):
    """Reconcile after a crash: the node that reaps a dead one sends the vacated (and
    member_removed) webhooks the dead node never could, once."""
    prefix = f"whtest-{uniq()}"
    env = hook_env(receiver.url, {"FASTRELAY_REDIS_URL": "redis://127.0.0.1:6379/0",
                                  "FASTRELAY_KEY_PREFIX": prefix, "FASTRELAY_NODE_TIMEOUT": "1",
                                  "FASTRELAY_CLUSTER_SECRET": "s", "FASTRELAY_WORKERS": "1"})
    survivor, doomed = fresh_relay(env), fresh_relay(env)
    only_there = f"lonely-{uniq()}"
    shared = f"shared-{uniq()}"
    presence = f"presence-{uniq()}"
    ws = connect(doomed)
    ws.subscribe(only_there)
    ws.subscribe(shared)
    keep = connect(survivor)
    keep.subscribe(shared)
    ghost = member(doomed, presence, "ghost")  # kept open until the node dies
    sdk = survivor.pusher()
    receiver.wait(lambda e: names(e, "member_added", presence) and names(e, "channel_occupied", only_there),
                  validator=sdk)
    time.sleep(0.3)  # counts reach Redis every 100 ms: what a node never wrote cannot be reconciled
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait()
    receiver.wait(lambda e: names(e, "channel_vacated", only_there) and names(e, "member_removed", presence),
                  timeout=10, validator=sdk)
    time.sleep(DELAY + 1.5)  # another reaping round must not repeat them
    evs = receiver.events()
    assert len(names(evs, "channel_vacated", only_there)) == 1
    assert len(names(evs, "member_removed", presence)) == 1
    assert names(evs, "channel_vacated", shared) == []  # the survivor still has a subscriber
    for w in (ws, keep, ghost):
        w.close()
