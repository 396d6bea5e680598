"""Scale-out: worker processes on one port and nodes on different ports sharing a Redis bus
behave as one server (delivery once, presence, exclusion, terminate, dead nodes, outages)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from wsclient import WS, api, connect, join_presence, signin

REDIS = "redis://127.0.0.1:6379/0"


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def cluster_env() -> Iterator[dict[str, str]]:
    prefix = f"frc{uid()}"
    yield {"FASTRELAY_REDIS_URL": REDIS, "FASTRELAY_KEY_PREFIX": prefix,
           "FASTRELAY_CLUSTER_SECRET": "cluster-test-secret", "FASTRELAY_NODE_TIMEOUT": "2",
           "FASTRELAY_WORKERS": "1"}  # one process per node, so kill -9 kills a whole node
    r = redis.Redis.from_url(REDIS)
    keys = list(r.scan_iter(f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()


def drain(ws: WS, seconds: float = 0.3) -> list[dict]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(ws.recv(max(0.01, deadline - time.monotonic())))
        except TimeoutError:
            break
    return out


def test_workers_share_one_port_and_deliver_once(fresh_relay: Any, cluster_env: dict) -> None:
    relay = fresh_relay({**cluster_env, "FASTRELAY_WORKERS": "2"})
    channel = f"w-{uid()}"
    clients = [connect(relay) for _ in range(12)]
    for c in clients:
        c.subscribe(channel)
    time.sleep(0.2)
    sdk = relay.pusher()
    for i in range(5):
        sdk.trigger(channel, "tick", {"n": i})
    for c in clients:
        got = [m for m in drain(c, 0.8) if m.get("event") == "tick"]
        assert [m["data"]["n"] for m in got] == [0, 1, 2, 3, 4]  # each once, in order
    # the kernel spread the sockets over both workers: two distinct socket-id prefixes is not
    # guaranteed, but both worker processes are alive and serving
    workers = subprocess.run(["pgrep", "-P", str(relay.proc.pid)], capture_output=True, text=True)
    assert len(workers.stdout.split()) == 2
    for c in clients:
        c.close()


def test_a_crashed_worker_is_restarted(fresh_relay: Any, cluster_env: dict) -> None:
    relay = fresh_relay({**cluster_env, "FASTRELAY_WORKERS": "2"})
    before = subprocess.run(["pgrep", "-P", str(relay.proc.pid)], capture_output=True,
                            text=True).stdout.split()
    os.kill(int(before[0]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    after: list[str] = []
    while time.monotonic() < deadline:
        after = subprocess.run(["pgrep", "-P", str(relay.proc.pid)], capture_output=True,
                               text=True).stdout.split()
        if len(after) == 2 and before[0] not in after:
            break
        time.sleep(0.1)
    assert len(after) == 2 and before[0] not in after
    ws = connect(relay)
    ws.subscribe("after-crash")
    relay.pusher().trigger("after-crash", "ok", "1")
    assert ws.expect("ok")["raw_data"] == "1"
    ws.close()


def test_three_nodes_act_as_one(fresh_relay: Any, cluster_env: dict) -> None:
    a, b, c = (fresh_relay(cluster_env) for _ in range(3))
    channel = f"pub-{uid()}"
    wa, wb, wc = connect(a), connect(b), connect(c)
    for w in (wa, wb, wc):
        w.subscribe(channel)
    a.pusher().trigger(channel, "hello", {"from": "a"})
    for w in (wa, wb, wc):
        assert [m["event"] for m in drain(w, 0.5)] == ["hello"]
    # socket_id exclusion across nodes: B's socket is left out by a trigger on C
    c.pusher().trigger(channel, "not-b", {}, socket_id=wb.socket_id)
    assert [m["event"] for m in drain(wa, 0.5)] == ["not-b"]
    assert drain(wb, 0.3) == []
    # the HTTP API answers cluster-wide
    time.sleep(0.3)  # counts are flushed to Redis every 100 ms
    info = api(c, "GET", f"/apps/{c.app_id}/channels/{channel}", params={"info": "subscription_count"})
    assert info.json() == {"occupied": True, "subscription_count": 3}
    for w in (wa, wb, wc):
        w.close()


def test_presence_across_nodes(fresh_relay: Any, cluster_env: dict) -> None:
    a, b, c = (fresh_relay(cluster_env) for _ in range(3))
    channel = f"presence-{uid()}"
    u1a = connect(a)
    ok = join_presence(a, u1a, channel, "u1", {"name": "u1"})
    assert ok["data"]["presence"]["ids"] == ["u1"]
    u2b = connect(b)
    ok = join_presence(b, u2b, channel, "u2", {"name": "u2"})
    assert sorted(ok["data"]["presence"]["ids"]) == ["u1", "u2"]
    assert ok["data"]["presence"]["hash"]["u1"] == {"name": "u1"}
    added = u1a.expect("pusher_internal:member_added", channel)
    assert added["data"] == {"user_id": "u2", "user_info": {"name": "u2"}}
    # a second connection of u1, on C: no member_added anywhere
    u1c = connect(c)
    ok = join_presence(c, u1c, channel, "u1", {"name": "u1"})
    assert ok["data"]["presence"]["count"] == 2
    assert drain(u2b, 0.4) == [] and drain(u1a, 0.1) == []
    users = api(c, "GET", f"/apps/{c.app_id}/channels/{channel}/users").json()
    assert sorted(u["id"] for u in users["users"]) == ["u1", "u2"]
    # u1 leaves A but stays on C: no member_removed; then leaves C: exactly one
    u1a.close()
    assert drain(u2b, 0.5) == []
    u1c.close()
    removed = [m for m in drain(u2b, 1.0) if m["event"] == "pusher_internal:member_removed"]
    assert [m["data"] for m in removed] == [{"user_id": "u1"}]
    u2b.close()


def test_terminate_connections_reaches_every_node(fresh_relay: Any, cluster_env: dict) -> None:
    a, b = fresh_relay(cluster_env), fresh_relay(cluster_env)
    socks = []
    for relay in (a, b):
        ws = connect(relay)
        signin(relay, ws, {"id": "t1"})
        socks.append(ws)
    resp = api(a, "POST", f"/apps/{a.app_id}/users/t1/terminate_connections", body={})
    assert resp.status == 200
    for ws in socks:
        err, frame = ws.expect_error_close(4009)
        assert err["data"]["code"] == 4009


def test_dead_node_members_vanish(fresh_relay: Any, cluster_env: dict) -> None:
    a, b = fresh_relay(cluster_env), fresh_relay(cluster_env)
    channel = f"presence-{uid()}"
    wa = connect(a)
    join_presence(a, wa, channel, "alive", {"name": "alive"})
    wb = connect(b)
    join_presence(b, wb, channel, "doomed", {"name": "doomed"})
    wa.expect("pusher_internal:member_added", channel)
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    removed = wa.expect("pusher_internal:member_removed", channel, timeout=10)  # node_timeout 2 s
    assert removed["data"] == {"user_id": "doomed"}
    assert drain(wa, 1.0) == []  # exactly one
    users = api(a, "GET", f"/apps/{a.app_id}/channels/{channel}/users").json()
    assert users == {"users": [{"id": "alive"}]}
    a.pusher().trigger(channel, "still", {})
    assert wa.expect("still")


def test_forged_bus_messages_are_dropped(fresh_relay: Any, cluster_env: dict) -> None:
    a = fresh_relay(cluster_env)
    channel = f"forge-{uid()}"
    wa = connect(a)
    wa.subscribe(channel)
    r = redis.Redis.from_url(REDIS)
    body = json.dumps(["0" * 16, time.time(), [["ev", ["x", a.app_id, [channel], "evil", "{}",
                                                        None, "api", time.time(), None]]]])
    r.publish(f"{cluster_env['FASTRELAY_KEY_PREFIX']}:bus", b"\0" * 16 + body.encode())
    r.publish(f"{cluster_env['FASTRELAY_KEY_PREFIX']}:bus", b"garbage")
    r.close()
    assert drain(wa, 0.5) == []
    a.pusher().trigger(channel, "real", {})
    assert [m["event"] for m in drain(wa, 0.5)] == ["real"]


@pytest.fixture
def private_redis(tmp_path: Any) -> Iterator[tuple[int, Any]]:
    """A Redis of our own, so it can be stopped and started without disturbing others."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start() -> subprocess.Popen:
        p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                return p
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    procs = [start()]
    yield port, lambda: procs.append(start()), procs
    for p in procs:
        p.kill()
        p.wait()


def test_delivery_resumes_after_redis_restart(fresh_relay: Any, private_redis: Any) -> None:
    port, restart, procs = private_redis
    env = {"FASTRELAY_REDIS_URL": f"redis://127.0.0.1:{port}/0", "FASTRELAY_KEY_PREFIX": "rr",
           "FASTRELAY_CLUSTER_SECRET": "s", "FASTRELAY_NODE_TIMEOUT": "2", "FASTRELAY_WORKERS": "1"}
    a, b = fresh_relay(env), fresh_relay(env)
    channel = f"rr-{uid()}"
    wb = connect(b)
    wb.subscribe(channel)
    time.sleep(0.2)
    a.pusher().trigger(channel, "before", {})
    assert wb.expect("before")
    procs[0].kill()
    procs[0].wait()
    # local traffic goes on while Redis is away
    wa = connect(a)
    wa.subscribe(channel)
    a.pusher().trigger(channel, "local", {})
    assert wa.expect("local")
    restart()
    deadline = time.monotonic() + 15
    got: list[str] = []
    while time.monotonic() < deadline and "after" not in got:
        a.pusher().trigger(channel, "after", {})
        got += [m["event"] for m in drain(wb, 0.5)]
    assert "after" in got
    assert a.proc.poll() is None and b.proc.poll() is None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster-bus twins (port + 10000) are free too."""
    import random

    ports: list[int] = []
    while len(ports) < n:
        p = random.randrange(20000, 45000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        ports.append(p)
    return ports


def _wait_redis(port: int) -> None:
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis on {port} did not start")


@pytest.fixture
def redis_cluster_url(tmp_path: Any) -> Iterator[str]:
    """A 3-node Redis Cluster of our own on free local ports."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    ports = _cluster_ports(3)
    procs = []
    for p in ports:
        d = tmp_path / str(p)
        d.mkdir()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no", "--dir", str(d)],
            stdout=subprocess.DEVNULL))
    try:
        for p in ports:
            _wait_redis(p)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        for _ in range(100):
            info = subprocess.run(["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                                  capture_output=True, text=True).stdout
            if "cluster_state:ok" in info:
                break
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_sentinel_url(tmp_path: Any) -> Iterator[str]:
    """A Redis master watched by one Sentinel, both our own."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    master, sentinel = _free_ports(2)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master} 1\n"
                    f"dir {tmp_path}\n")
    procs = [subprocess.Popen(["redis-server", "--port", str(master), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL),
             subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)]
    try:
        _wait_redis(master)
        _wait_redis(sentinel)
        yield f"redis+sentinel://127.0.0.1:{sentinel}/mymaster"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_redis_cluster_and_sentinel_urls(fresh_relay: Any, kind: str, request: Any) -> None:
    url = request.getfixturevalue("redis_cluster_url" if kind == "cluster" else "redis_sentinel_url")
    env = {"FASTRELAY_REDIS_URL": url, "FASTRELAY_KEY_PREFIX": f"k{uid()}", "FASTRELAY_CLUSTER_SECRET": "s",
           "FASTRELAY_WORKERS": "1"}
    a, b = fresh_relay(env), fresh_relay(env)
    channel = f"presence-{uid()}"
    wb = connect(b)
    wb.subscribe("plain")
    a.pusher().trigger("plain", "across", {"via": kind})
    assert wb.expect("across")["data"] == {"via": kind}
    wa = connect(a)
    join_presence(a, wa, channel, "u1", {"name": "u1"})
    ok = join_presence(b, wb, channel, "u2", {"name": "u2"})
    assert sorted(ok["data"]["presence"]["ids"]) == ["u1", "u2"]
    assert wa.expect("pusher_internal:member_added", channel)["data"]["user_id"] == "u2"
    users = api(a, "GET", f"/apps/{a.app_id}/channels/{channel}/users").json()
    assert sorted(u["id"] for u in users["users"]) == ["u1", "u2"]
