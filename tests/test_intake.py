"""The intake API end to end: signed POST /api/events -> 202 -> a WebSocket subscriber and an
audit row; every error status; idempotency; rate limits; replay; PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson
import picows
import pytest
import redis
from wsclient import intake_headers

from fastrelay.signatures import sign_api_request

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def uid() -> str:
    return uuid.uuid4().hex[:10]


def post_event(relay: Any, body: dict | bytes, *, secret: str | None = None,
               ts: int | None = None, headers: dict[str, str] | None = None,
               signed: bool = True) -> tuple[int, dict, dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = intake_headers(secret or relay.secret, raw, ts) if signed else {"Content-Type": "application/json"}
    h.update(headers or {})
    return http(relay, "POST", "/api/events", raw, h)


def http(relay: Any, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    req = urllib.request.Request(relay.http_url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read()), dict(e.headers)


def signed_get(relay: Any, path: str, **params: str) -> tuple[int, dict, dict[str, str]]:
    q = sign_api_request(relay.key, relay.secret, "GET", path, params=params)
    return http(relay, "GET", path + "?" + urlencode(q))


class Collector(picows.WSListener):
    def __init__(self) -> None:
        self.messages: asyncio.Queue[dict] = asyncio.Queue()

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.TEXT:
            self.messages.put_nowait(orjson.loads(frame.get_payload_as_bytes()))


class Subscriber:
    """A bare WebSocket client on one public channel."""

    @classmethod
    async def open(cls, relay: Any, channel: str) -> Subscriber:
        self = cls()
        self.transport, self.listener = await picows.ws_connect(Collector, relay.ws_url())
        hello = await self.next()
        assert hello["event"] == "pusher:connection_established"
        self.socket_id = json.loads(hello["data"])["socket_id"]
        self.transport.send(picows.WSMsgType.TEXT, orjson.dumps(
            {"event": "pusher:subscribe", "data": {"channel": channel}}))
        ok = await self.next()
        assert ok["event"] == "pusher_internal:subscription_succeeded", ok
        return self

    async def next(self, timeout: float = 5.0) -> dict:
        return await asyncio.wait_for(self.listener.messages.get(), timeout)

    async def nothing(self, timeout: float = 0.3) -> None:
        with pytest.raises(asyncio.TimeoutError):
            msg = await self.next(timeout)
            pytest.fail(f"unexpected message {msg}")

    def close(self) -> None:
        self.transport.disconnect()


async def test_signed_intake_reaches_subscriber_and_audit(relay: Any) -> None:
    channel = f"orders-{uid()}"
    sub = await Subscriber.open(relay, channel)
    status, body, _ = post_event(relay, {"app_key": relay.key, "channel": channel,
                                         "event": "order.paid", "data": {"id": 42, "note": "é"}})
    assert status == 202, body
    assert set(body) == {"id", "accepted_at"} and abs(body["accepted_at"] - time.time()) < 5
    msg = await sub.next()
    assert msg == {"event": "order.paid", "channel": channel, "data": '{"id":42,"note":"é"}'}
    sub.close()
    for _ in range(50):  # the audit writes in batches every few ms
        status, page, _ = signed_get(relay, "/api/events", channel=channel)
        if page.get("events"):
            break
        await asyncio.sleep(0.05)
    assert status == 200
    [row] = page["events"]
    assert row["id"] == body["id"] and row["channels"] == [channel] and row["name"] == "order.paid"
    assert row["source"] == "intake" and json.loads(row["data"]) == {"id": 42, "note": "é"}


async def test_ids_are_time_ordered_and_pages_go_back_in_time(relay: Any) -> None:
    channel = f"page-{uid()}"
    ids = []
    for i in range(5):
        status, body, _ = post_event(relay, {"app_key": relay.key, "channels": [channel],
                                             "event": "tick", "data": i})
        assert status == 202
        ids.append(body["id"])
    assert ids == sorted(ids) and len(set(ids)) == 5
    await asyncio.sleep(0.2)
    _, first, _ = signed_get(relay, "/api/events", channel=channel, limit="3")
    assert [e["id"] for e in first["events"]] == ids[:1:-1][:3] == [ids[4], ids[3], ids[2]]
    _, second, _ = signed_get(relay, "/api/events", channel=channel, limit="3", before=first["next"])
    assert [e["id"] for e in second["events"]] == [ids[1], ids[0]]
    _, by_event, _ = signed_get(relay, "/api/events", channel=channel, event="nope")
    assert by_event["events"] == []


def test_error_statuses(relay: Any) -> None:
    good = {"app_key": relay.key, "channel": "c1", "event": "e", "data": 1}
    assert post_event(relay, good, secret="wrong")[0] == 401
    assert post_event(relay, good, ts=int(time.time()) - 301)[0] == 401
    # '²'.isdigit() is True but int('²') raises: refused with 401, not a 500
    assert post_event(relay, good, headers={"X-Fastrelay-Timestamp": "\u00b2"})[0] == 401
    assert post_event(relay, good, signed=False)[0] == 401
    status, body, _ = post_event(relay, {**good, "app_key": "no-such-key"})
    assert status == 404 and body == {"error": "unknown app"}
    status, body, _ = post_event(relay, {**good, "data": "x" * 10_241})
    assert status == 413 and "10240" in body["error"]
    status, body, _ = post_event(relay, {"app_key": relay.key, "channels": ["ok", "bad name"],
                                         "event": "x" * 201, "socket_id": "abc", "color": 1})
    assert status == 422
    assert set(body["fields"]) == {"channels", "event", "data", "socket_id", "color"}
    status, body, _ = post_event(relay, {**good, "channels": [f"c{i}" for i in range(101)]})
    assert status == 422 and "100" in body["fields"]["channels"]
    assert post_event(relay, b"not json")[0] == 400
    assert http(relay, "DELETE", "/api/events")[0] == 405


def test_pusher_query_signature_is_accepted(relay: Any) -> None:
    raw = json.dumps({"app_key": relay.key, "channel": "c2", "event": "e", "data": {}}).encode()
    q = sign_api_request(relay.key, relay.secret, "POST", "/api/events", raw)
    status, body, _ = http(relay, "POST", "/api/events?" + urlencode(q), raw,
                           {"Content-Type": "application/json"})
    assert status == 202, body
    q["auth_signature"] = "0" * 64
    assert http(relay, "POST", "/api/events?" + urlencode(q), raw)[0] == 401


async def test_idempotent_repeat_is_neither_delivered_nor_stored_twice(relay: Any) -> None:
    channel = f"idem-{uid()}"
    sub = await Subscriber.open(relay, channel)
    ev = {"app_key": relay.key, "channel": channel, "event": "once", "data": 1,
          "idempotency_key": uid()}
    s1, b1, _ = post_event(relay, ev)
    s2, b2, h2 = post_event(relay, ev)
    assert s1 == s2 == 202 and b1 == b2 and h2.get("Idempotent-Replayed") == "true"
    assert (await sub.next())["event"] == "once"
    await sub.nothing()
    sub.close()
    await asyncio.sleep(0.1)
    assert len(signed_get(relay, "/api/events", channel=channel)[1]["events"]) == 1


async def test_socket_id_is_excluded(relay: Any) -> None:
    channel = f"excl-{uid()}"
    a = await Subscriber.open(relay, channel)
    b = await Subscriber.open(relay, channel)
    assert post_event(relay, {"app_key": relay.key, "channel": channel, "event": "e", "data": 1,
                              "socket_id": a.socket_id})[0] == 202
    assert (await b.next())["event"] == "e"
    await a.nothing()
    a.close()
    b.close()


async def test_replay_sends_the_stored_event_again(relay: Any) -> None:
    channel = f"replay-{uid()}"
    sub = await Subscriber.open(relay, channel)
    _, first, _ = post_event(relay, {"app_key": relay.key, "channel": channel, "event": "r",
                                     "data": {"v": 1}})
    assert (await sub.next())["data"] == '{"v":1}'
    await asyncio.sleep(0.1)
    q = sign_api_request(relay.key, relay.secret, "POST", f"/api/events/{first['id']}/replay")
    status, body, _ = http(relay, "POST", f"/api/events/{first['id']}/replay?" + urlencode(q))
    assert status == 202 and body["replay_of"] == first["id"] and body["id"] != first["id"]
    again = await sub.next()
    assert again == {"event": "r", "channel": channel, "data": '{"v":1}'}
    sub.close()
    await asyncio.sleep(0.1)
    rows = signed_get(relay, "/api/events", channel=channel)[1]["events"]
    assert [(r["source"], r["replay_of"]) for r in rows] == [("replay", first["id"]), ("intake", None)]
    q = sign_api_request(relay.key, relay.secret, "POST", "/api/events/nope/replay")
    assert http(relay, "POST", "/api/events/nope/replay?" + urlencode(q))[0] == 404


def test_rate_limit_answers_429_with_headers(fresh_relay: Any) -> None:
    relay = fresh_relay({"FASTRELAY_APP_RATE_LIMIT": "5", "FASTRELAY_APP_RATE_BURST": "5"})
    ev = {"app_key": relay.key, "channel": "burst", "event": "e", "data": 1}
    statuses = [post_event(relay, ev)[0] for _ in range(5)]
    assert statuses == [202] * 5
    status, body, headers = post_event(relay, ev)
    assert status == 429 and "rate limit" in body["error"]
    assert int(headers["Retry-After"]) >= 1 and headers["X-RateLimit-Limit"] == "5"
    assert headers["X-RateLimit-Remaining"] == "0" and "X-RateLimit-Reset" in headers
    # the Pusher HTTP API shares the bucket: a quick run of triggers is refused too
    sdk = relay.pusher()
    refused = []
    for _ in range(10):
        try:
            sdk.trigger("burst", "e", "x")
        except Exception as e:  # the SDK raises on any non-2xx
            refused.append(str(e))
    assert refused and all("429" in r or "rate limit" in r for r in refused), refused


def test_clean_shutdown_flushes_every_accepted_event(fresh_relay: Any) -> None:
    relay = fresh_relay()
    accepted = []
    for i in range(200):
        status, body, _ = post_event(relay, {"app_key": relay.key, "channel": "flush",
                                             "event": "e", "data": i})
        assert status == 202
        accepted.append(body["id"])
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(15) == 0
    db = sqlite3.connect(Path(relay.env["FASTRELAY_DATA_DIR"]) / "audit.sqlite3")
    stored = {r[0] for r in db.execute("SELECT id FROM audit_events WHERE app_id = ?", (relay.app_id,))}
    assert set(accepted) <= stored


async def test_postgresql_audit_survives_killed_connections(fresh_relay: Any) -> None:
    relay = fresh_relay({"FASTRELAY_DATABASE_URL": PG_URL, "FASTRELAY_APP_ID": str(time.time_ns())})
    conn = await asyncpg.connect(PG_URL)
    try:
        accepted = []
        for i in range(600):
            status, body, _ = post_event(relay, {"app_key": relay.key, "channel": "pg",
                                                 "event": "e", "data": i})
            assert status == 202
            accepted.append(body["id"])
            if i % 150 == 75:  # cut the audit's connections mid-stream
                await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE application_name = 'fastrelay-audit' AND pid <> pg_backend_pid()")
        rows: list = []
        for _ in range(100):
            rows = await conn.fetch("SELECT id FROM audit_events WHERE app_id = $1", relay.app_id)
            if len(rows) >= len(accepted):
                break
            await asyncio.sleep(0.1)
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) == len(accepted)  # each exactly once
        assert set(ids) == set(accepted)
    finally:
        await conn.close()


async def test_observers_get_metadata_on_redis(fresh_relay: Any) -> None:
    prefix = f"frtest{uid()}"
    relay = fresh_relay({"FASTRELAY_REDIS_URL": "redis://127.0.0.1:6379/0",
                         "FASTRELAY_KEY_PREFIX": prefix})
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    ps = r.pubsub()
    ps.subscribe(f"{prefix}:events")
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    _, body, _ = post_event(relay, {"app_key": relay.key, "channel": "obs", "event": "seen",
                                    "data": {"secret": "payload"}})
    msg = None
    deadline = time.monotonic() + 5
    while msg is None and time.monotonic() < deadline:
        msg = ps.get_message(timeout=1)
    assert msg is not None
    meta = json.loads(msg["data"])
    assert meta["id"] == body["id"] and meta["channels"] == ["obs"] and meta["event"] == "seen"
    assert meta["source"] == "intake" and meta["size"] == len('{"secret":"payload"}')
    assert "data" not in meta and "payload" not in msg["data"].decode()
    ps.close()
    r.close()


def test_audited_client_events_keep_object_data(fresh_relay: Any) -> None:
    """pusher-js sends client event data as a JSON object, not a string: the audit stores it
    as JSON text, as it does the HTTP API's data, instead of rejecting the row."""
    from test_protocol import auth
    from wsclient import connect

    relay = fresh_relay({"FASTRELAY_APP_AUDIT_CLIENT_EVENTS": "true"})
    channel = f"private-typing-{uid()}"
    a, b = connect(relay), connect(relay)
    a.subscribe(channel, auth(relay, a, channel))
    b.subscribe(channel, auth(relay, b, channel))
    a.send_json("client-typing", {"who": "a", "n": [1, 2]}, channel)
    assert b.expect("client-typing", channel)["data"] == {"who": "a", "n": [1, 2]}
    a.send_json("client-typing", "plain text", channel)
    assert b.expect("client-typing", channel)["data"] == "plain text"
    a.close()
    b.close()
    rows: list = []
    for _ in range(100):
        status, page, _ = signed_get(relay, "/api/events", channel=channel)
        rows = page.get("events", [])
        if len(rows) == 2:
            break
        time.sleep(0.05)
    assert [(r["source"], r["name"]) for r in rows] == [("client", "client-typing")] * 2, rows
    assert rows[1]["data"] == '{"who":"a","n":[1,2]}' and rows[0]["data"] == "plain text"
    assert not (Path(relay.env["FASTRELAY_DATA_DIR"]) / "audit.rejected.jsonl").exists()
