"""Pusher protocol v7 over real sockets: connect, ping, subscriptions, presence, client events,
sign-in, and bad input (which must never take the worker down).

Every test talks to a real server process through tests/wsclient.py (hand-built frames), and
asserts exact codes and payloads. Tests on the shared `relay` use their own channel names;
tests that need other settings start a `fresh_relay` with short timeouts.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
import uuid

import pytest
from wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    api,
    build_frame,
    connect,
    join_presence,
    open_ws,
    signin,
    up,
    user_auth,
)

from fastrelay.signatures import sign_channel

FAST = {  # short clocks for the tests that wait on the sweep
    "FASTRELAY_ACTIVITY_TIMEOUT": "1",
    "FASTRELAY_PONG_TIMEOUT": "1",
    "FASTRELAY_SWEEP_INTERVAL": "0.2",
}


def uid(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


def auth(relay, ws, channel: str, channel_data: str | None = None) -> str:
    return sign_channel(relay.key, relay.secret, ws.socket_id, channel, channel_data)


def assert_alive(relay) -> None:
    """The worker still answers HTTP and accepts a fresh, working WebSocket."""
    assert up(relay)
    with connect(relay) as ws:
        ws.send_json("pusher:ping", {})
        ws.expect("pusher:pong")


def still_open(ws) -> None:
    ws.send_json("pusher:ping", {})
    ws.expect("pusher:pong")


# ================================================================ connection


def test_connection_established_shape(relay):
    ws = open_ws(relay)
    f = ws.recv_frame()
    assert f.opcode == OP_TEXT and f.fin
    msg = json.loads(f.payload)
    assert msg["event"] == "pusher:connection_established"
    assert isinstance(msg["data"], str), "data must be a JSON string (double-encoded)"
    data = json.loads(msg["data"])
    assert re.fullmatch(r"\d+\.\d+", data["socket_id"])
    assert isinstance(data["activity_timeout"], int) and data["activity_timeout"] > 0
    ws.close()


def test_socket_ids_unique(relay):
    conns = [connect(relay) for _ in range(5)]
    assert len({c.socket_id for c in conns}) == 5
    for c in conns:
        c.close()


def test_unknown_app_key_4001(relay):
    ws = open_ws(relay, key="no-such-key")
    msg, close = ws.expect_error_close(4001)
    assert msg["data"]["message"]
    assert ws.is_eof()


@pytest.mark.parametrize("query,code", [
    ("client=js&version=8.4.0", 4008),
    ("protocol=abc", 4006),
    ("protocol=", 4006),
    ("protocol=99", 4007),
    ("protocol=3", 4007),
])
def test_protocol_version_errors(relay, query, code):
    ws = open_ws(relay, query=query)
    ws.expect_error_close(code)


def test_protocol_version_non_ascii_digit(relay):
    # '²' is str.isdigit() but int() refuses it: the version check must not raise
    ws = open_ws(relay, query="protocol=%C2%B2")
    ws.expect_error_close(4006, timeout=2)
    assert_alive(relay)


def test_frames_in_the_upgrade_packet(relay):
    """A client may send frames right behind the upgrade request, in the same packet."""
    with socket.create_connection((relay.host, relay.port), timeout=3) as s:
        req = (f"GET /app/{relay.key}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        s.sendall(req + build_frame(b"hi", OP_PING) + build_frame('{"event":"pusher:ping"}'))
        from wsclient import parse_frame, read_http_response
        buf = bytearray()
        r = read_http_response(s, buf)
        assert r.status == 101
        assert r.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        frames = []
        deadline = time.monotonic() + 3
        while len(frames) < 3 and time.monotonic() < deadline:
            got = parse_frame(buf)
            if got is None:
                buf += s.recv(4096)
                continue
            frames.append(got[0])
            del buf[:got[1]]
        kinds = [(f.opcode, json.loads(f.payload)["event"] if f.opcode == OP_TEXT else f.payload)
                 for f in frames]
        assert kinds[0] == (OP_TEXT, "pusher:connection_established")
        assert (OP_PONG, b"hi") in kinds and (OP_TEXT, "pusher:pong") in kinds


def test_disabled_app_4003(fresh_relay):
    r = fresh_relay({"FASTRELAY_APP_ENABLED": "false"})
    ws = open_ws(r)
    ws.expect_error_close(4003)


def test_max_connections_4004(fresh_relay):
    r = fresh_relay({"FASTRELAY_APP_MAX_CONNECTIONS": "2"})
    a, b = connect(r), connect(r)
    c = open_ws(r)
    c.expect_error_close(4004)
    a.close()
    time.sleep(0.2)
    d = connect(r)  # a's slot is free again
    still_open(d)
    still_open(b)


def test_allowed_origins_4009(fresh_relay):
    r = fresh_relay({"FASTRELAY_APP_ALLOWED_ORIGINS": "https://good.example,*.trusted.example"})
    connect(r, headers={"Origin": "https://good.example"}).close()
    connect(r, headers={"Origin": "https://app.trusted.example"}).close()
    open_ws(r, headers={"Origin": "https://evil.example"}).expect_error_close(4009)
    open_ws(r, headers={"Origin": "https://eviltrusted.example"}).expect_error_close(4009)
    open_ws(r).expect_error_close(4009)  # no Origin at all


def test_user_authentication_required_4009(fresh_relay):
    r = fresh_relay({**FAST, "FASTRELAY_APP_USER_AUTHENTICATION": "true",
                     "FASTRELAY_APP_USER_AUTH_TIMEOUT": "0.5"})
    lazy = connect(r)
    good = connect(r)
    signin(r, good, {"id": "u1"})
    t0 = time.monotonic()
    lazy.expect_error_close(4009, timeout=3)
    assert time.monotonic() - t0 < 2.5
    time.sleep(0.3)
    still_open(good)


def test_upgrade_errors(relay):
    from wsclient import http
    r = http(relay, "GET", f"/app/{relay.key}?protocol=7")  # no Upgrade header
    assert r.status == 426 and "error" in r.json()
    r = http(relay, "POST", f"/app/{relay.key}?protocol=7", headers={"Upgrade": "websocket"})
    assert r.status == 405
    r = http(relay, "GET", f"/app/{relay.key}?protocol=7",
             headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "8",
                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status == 400


# ================================================================ ping / pong


def test_pusher_ping_pong(relay):
    with connect(relay) as ws:
        ws.send_json("pusher:ping", {})
        msg = ws.expect("pusher:pong")
        assert msg["data"] == {}
        # the data may also be double-encoded, or absent
        ws.send_json("pusher:ping", "{}")
        ws.expect("pusher:pong")
        ws.send_json({"event": "pusher:ping"})
        ws.expect("pusher:pong")


def test_websocket_ping_frame(relay):
    with connect(relay) as ws:
        for payload in (b"", b"abc", bytes(range(125))):
            ws.send_frame(payload, OP_PING)
            f = ws.recv_frame()
            assert f.opcode == OP_PONG and f.fin and f.payload == payload
            assert not f.masked, "server frames are never masked"
        ws.send_frame(b"unsolicited", OP_PONG)  # allowed, ignored
        still_open(ws)


def test_server_pings_silent_client_then_4201(fresh_relay):
    """activity_timeout=1, pong_timeout=1: a silent client is pinged after ~1 s and closed with
    4201 ~1 s later; one that answers the ping stays; one that talks is never pinged."""
    r = fresh_relay(FAST)
    silent, polite, chatty = connect(r), connect(r), connect(r)
    assert silent.established["activity_timeout"] == 1
    t0 = time.monotonic()
    silent_events: list[tuple[float, str, int | None]] = []
    pinged_chatty = False
    answered = 0
    while time.monotonic() - t0 < 3.2:
        chatty.send_json("pusher:ping", {})
        m = chatty.recv(timeout=1, skip_pings=False)
        pinged_chatty |= m["event"] == "pusher:ping"
        for ws in (silent, polite):
            try:
                f = ws.recv_frame(timeout=0.1)
            except TimeoutError:
                continue
            if ws is silent:
                ev = json.loads(f.payload)["event"] if f.opcode == OP_TEXT else "close"
                silent_events.append((time.monotonic() - t0, ev, f.close_code))
            elif f.opcode == OP_TEXT and json.loads(f.payload)["event"] == "pusher:ping":
                polite.send_json("pusher:pong", {})
                answered += 1
        if silent_events and silent_events[-1][1] == "close" and answered:
            break
    assert [e[1] for e in silent_events] == ["pusher:ping", "close"], silent_events
    assert 0.8 <= silent_events[0][0] < 2.2, silent_events
    assert silent_events[1][2] == 4201
    assert 0.8 <= silent_events[1][0] - silent_events[0][0] < 2.0, silent_events
    assert answered >= 1
    assert not pinged_chatty, "any message counts as activity"
    still_open(polite)
    still_open(chatty)
    assert "connection closed code=4201" in r.log()  # one log line per connection error


# ================================================================ subscriptions


def test_public_subscribe_and_trigger(relay):
    ch = uid("pub-")
    with connect(relay) as ws:
        msg = ws.subscribe(ch)
        assert msg["data"] == {} and msg["raw_data"] == "{}"
        relay.pusher().trigger(ch, "my-event", {"x": 1})
        ev = ws.expect("my-event", ch)
        assert ev["raw_data"] == '{"x": 1}' and "user_id" not in ev
        # subscribing twice confirms again without a second membership
        ws.subscribe(ch)
        relay.pusher().trigger(ch, "again", "plain")
        assert ws.expect("again", ch)["raw_data"] == "plain"
        ws.nothing(0.2)


def test_private_subscribe(relay):
    ch = uid("private-")
    with connect(relay) as ws:
        ws.subscribe(ch, auth(relay, ws, ch))
    with connect(relay) as ws:  # the SDK's signature
        a = relay.pusher().authenticate(ch, ws.socket_id)
        ws.subscribe(ch, a["auth"])


@pytest.mark.parametrize("bad", ["wrong", "{key}:" + "0" * 64, "other-key:{sig}", "{key}:{sig_other}",
                                 None, 12345])
def test_private_bad_auth(relay, bad):
    ch = uid("private-")
    with connect(relay) as ws:
        good = auth(relay, ws, ch)
        sig = good.split(":", 1)[1]
        other = sign_channel(relay.key, relay.secret, ws.socket_id, ch + "x").split(":", 1)[1]
        a = bad.format(key=relay.key, sig=sig, sig_other=other) if isinstance(bad, str) else bad
        data = {"channel": ch} if a is None else {"channel": ch, "auth": a}
        ws.send_json("pusher:subscribe", data)
        msg = ws.expect("pusher:subscription_error", ch)
        assert msg["data"]["type"] == "AuthError" and msg["data"]["status"] == 401
        assert msg["data"]["error"]
        still_open(ws)
        ws.subscribe(ch, good)  # a good one still works afterwards


def test_private_auth_bound_to_socket(relay):
    ch = uid("private-")
    a, b = connect(relay), connect(relay)
    b.send_json("pusher:subscribe", {"channel": ch, "auth": auth(relay, a, ch)})
    assert b.expect("pusher:subscription_error", ch)["data"]["status"] == 401
    a.close()
    b.close()


def test_presence_roster_and_member_events(relay):
    ch = uid("presence-")
    a = connect(relay)
    m = join_presence(relay, a, ch, "alice", {"name": "Alice"})
    assert m["data"] == {"presence": {"ids": ["alice"], "hash": {"alice": {"name": "Alice"}}, "count": 1}}
    b1 = connect(relay)
    m = join_presence(relay, b1, ch, "bob", {"name": "Bob"})
    p = m["data"]["presence"]
    assert sorted(p["ids"]) == ["alice", "bob"] and p["count"] == 2
    assert p["hash"] == {"alice": {"name": "Alice"}, "bob": {"name": "Bob"}}
    added = a.expect("pusher_internal:member_added", ch)
    assert added["data"] == {"user_id": "bob", "user_info": {"name": "Bob"}}
    b1.nothing(0.1)  # no member_added for oneself
    # bob's second connection: no member_added to anyone
    b2 = connect(relay)
    m = join_presence(relay, b2, ch, "bob", {"name": "Bob"})
    assert m["data"]["presence"]["count"] == 2
    a.nothing(0.2)
    b1.nothing(0.05)
    # bob's first connection leaves: bob is still present
    b1.close()
    a.nothing(0.3)
    # the HTTP API agrees
    users = relay.pusher().users_info(ch)
    assert sorted(u["id"] for u in users["users"]) == ["alice", "bob"]
    # the last one leaves (by unsubscribing): member_removed, once
    b2.send_json("pusher:unsubscribe", {"channel": ch})
    removed = a.expect("pusher_internal:member_removed", ch)
    assert removed["data"] == {"user_id": "bob"}
    a.nothing(0.2)
    still_open(b2)
    a.close()
    b2.close()


def test_presence_numeric_user_id(relay):
    ch = uid("presence-")
    with connect(relay) as ws:
        m = join_presence(relay, ws, ch, 42)
        assert m["data"]["presence"]["ids"] == ["42"]


def test_presence_sdk_auth(relay):
    ch = uid("presence-")
    with connect(relay) as ws:
        a = relay.pusher().authenticate(ch, ws.socket_id, {"user_id": "7", "user_info": {"n": 1}})
        m = ws.subscribe(ch, a["auth"], a["channel_data"])
        assert m["data"]["presence"]["hash"] == {"7": {"n": 1}}


def test_presence_member_limit(fresh_relay):
    r = fresh_relay({"FASTRELAY_APP_MAX_PRESENCE_MEMBERS": "2"})
    ch = "presence-room"
    a, b, c, a2 = connect(r), connect(r), connect(r), connect(r)
    join_presence(r, a, ch, "a")
    join_presence(r, b, ch, "b")
    join_presence(r, c, ch, "c", expect=False)
    err = c.expect("pusher:subscription_error", ch)
    assert err["data"]["type"] == "LimitReached"
    still_open(c)
    assert a.expect("pusher_internal:member_added", ch)["data"]["user_id"] == "b"
    m = join_presence(r, a2, ch, "a")  # a known member's second connection is not a new member
    assert m["data"]["presence"]["count"] == 2
    a.nothing(0.2)  # neither c (refused) nor a's second connection were announced
    b.nothing(0.05)
    assert sorted(u["id"] for u in r.pusher().users_info(ch)["users"]) == ["a", "b"]


def test_presence_errors(relay):
    ch = uid("presence-")
    with connect(relay) as ws:
        # channel_data missing
        ws.send_json("pusher:subscribe", {"channel": ch, "auth": auth(relay, ws, ch)})
        e = ws.expect("pusher:subscription_error", ch)
        assert e["data"]["status"] in (400, 401)
        # user_info larger than 1 KB
        cd = json.dumps({"user_id": "big", "user_info": {"blob": "x" * 1100}})
        ws.subscribe(ch, auth(relay, ws, ch, cd), cd, expect=False)
        e = ws.expect("pusher:subscription_error", ch)
        assert e["data"]["status"] == 400
        # no user_id, user_id too long, channel_data not JSON
        for cd in ('{"user_info":{}}', json.dumps({"user_id": "u" * 129}), "not json",
                   '{"user_id":""}', '{"user_id":true}', "[1]"):
            ws.subscribe(ch, auth(relay, ws, ch, cd), cd, expect=False)
            e = ws.expect("pusher:subscription_error", ch)
            assert e["data"]["status"] == 400, cd
        # a signature over other channel_data
        cd = json.dumps({"user_id": "x"})
        ws.subscribe(ch, auth(relay, ws, ch, '{"user_id":"y"}'), cd, expect=False)
        assert ws.expect("pusher:subscription_error", ch)["data"]["status"] == 401
        still_open(ws)
    assert relay.pusher().channel_info(ch)["occupied"] is False


def test_presence_user_info_exactly_1kb_is_fine(relay):
    ch = uid("presence-")
    info = "x" * (1024 - 2)  # JSON string with quotes: 1024 bytes
    with connect(relay) as ws:
        join_presence(relay, ws, ch, "u", info)


@pytest.mark.parametrize("name", ["bad name", "bad!", "a" * 201, "#internal", "private-é", "ch\u0000"])
def test_invalid_channel_names(relay, name):
    with connect(relay) as ws:
        ws.send_json("pusher:subscribe", {"channel": name})
        e = ws.recv()
        assert e["event"] in ("pusher:subscription_error", "pusher:error"), e
        if e["event"] == "pusher:subscription_error":
            assert e["data"]["status"] == 400
        still_open(ws)


def test_valid_channel_name_charset(relay):
    name = "Az09_-=@,.;" + "a" * (200 - 11)
    with connect(relay) as ws:
        ws.subscribe(name)


@pytest.mark.parametrize("data", [{}, {"channel": ""}, {"channel": 5}, "nope", None, []])
def test_subscribe_without_channel(relay, data):
    with connect(relay) as ws:
        ws.send_json({"event": "pusher:subscribe", "data": data})
        assert ws.expect("pusher:error")["data"]["message"]
        still_open(ws)


def test_channels_per_connection_limit(fresh_relay):
    r = fresh_relay({"FASTRELAY_MAX_CHANNELS_PER_CONNECTION": "3"})
    with connect(r) as ws:
        for i in range(3):
            ws.subscribe(f"c{i}")
        ws.send_json("pusher:subscribe", {"channel": "c3"})
        e = ws.expect("pusher:subscription_error", "c3")
        assert e["data"]["type"] == "LimitReached"
        ws.send_json("pusher:unsubscribe", {"channel": "c0"})
        ws.subscribe("c3")  # room again


def test_unsubscribe_stops_delivery(relay):
    ch = uid("pub-")
    p = relay.pusher()
    with connect(relay) as ws:
        ws.subscribe(ch)
        p.trigger(ch, "one", "1")
        ws.expect("one", ch)
        ws.send_json("pusher:unsubscribe", {"channel": ch})
        still_open(ws)  # unsubscribe has no reply; a pong proves it was handled
        p.trigger(ch, "two", "2")
        ws.nothing(0.3)
        assert p.channel_info(ch)["occupied"] is False
        ws.send_json("pusher:unsubscribe", {"channel": ch})  # again: harmless
        ws.send_json("pusher:unsubscribe", {"channel": 5})
        still_open(ws)


def test_cache_channel(relay):
    ch = uid("cache-")
    p = relay.pusher()
    with connect(relay) as ws:
        ws.subscribe(ch)
        ws.expect("pusher:cache_miss", ch)
    p.trigger(ch, "first", "1")
    p.trigger(ch, "last", {"v": 2})
    with connect(relay) as ws:
        ws.subscribe(ch)
        ev = ws.expect("last", ch)
        assert ev["data"] == {"v": 2}
        ws.nothing(0.2)


def test_private_cache_channel(relay):
    ch = uid("private-cache-")
    with connect(relay) as ws:
        ws.subscribe(ch, auth(relay, ws, ch))
        ws.expect("pusher:cache_miss", ch)


def test_subscription_count(fresh_relay):
    r = fresh_relay({"FASTRELAY_APP_SUBSCRIPTION_COUNT": "true"})
    a, b = connect(r), connect(r)
    a.subscribe("room")
    assert a.expect("pusher_internal:subscription_count", "room")["data"] == {"subscription_count": 1}
    b.subscribe("room")
    assert a.expect("pusher_internal:subscription_count", "room")["data"] == {"subscription_count": 2}
    assert b.expect("pusher_internal:subscription_count", "room")["data"] == {"subscription_count": 2}
    b.close()
    assert a.expect("pusher_internal:subscription_count", "room")["data"] == {"subscription_count": 1}
    # never on presence channels
    join_presence(r, a, "presence-x", "u")
    a.nothing(0.3)


def test_no_subscription_count_by_default(relay):
    ch = uid("pub-")
    with connect(relay) as ws:
        ws.subscribe(ch)
        ws.nothing(0.2)


# ================================================================ client events


def test_client_event_private(relay):
    ch = uid("private-")
    a, b = connect(relay), connect(relay)
    a.subscribe(ch, auth(relay, a, ch))
    b.subscribe(ch, auth(relay, b, ch))
    a.send_json("client-typing", {"who": "a"}, ch)
    ev = b.expect("client-typing", ch)
    assert ev["data"] == {"who": "a"} and "user_id" not in ev
    a.nothing(0.2)  # never echoed to the sender
    a.close()
    b.close()


def test_client_event_presence_has_user_id(relay):
    ch = uid("presence-")
    a, b = connect(relay), connect(relay)
    join_presence(relay, a, ch, "ann")
    join_presence(relay, b, ch, "ben")
    a.expect("pusher_internal:member_added", ch)
    b.send_json("client-hi", {"x": 1}, ch)
    ev = a.expect("client-hi", ch)
    assert ev["user_id"] == "ben" and ev["data"] == {"x": 1}
    a.close()
    b.close()


def test_client_event_refused(relay):
    pub, priv, enc = uid("pub-"), uid("private-"), uid("private-encrypted-")
    with connect(relay) as ws:
        ws.subscribe(pub)
        ws.subscribe(enc, auth(relay, ws, enc))
        for ch in (pub, priv, enc, None):  # public; not subscribed; encrypted; no channel
            ws.send_json("client-x", {}, ch)
            e = ws.expect("pusher:error")
            assert e["data"]["message"]
        long_name = "client-" + "x" * 200
        ws.subscribe(priv, auth(relay, ws, priv))
        ws.send_json(long_name, {}, priv)
        ws.expect("pusher:error")
        still_open(ws)


def test_client_event_rate_limit_4301(relay):
    ch = uid("private-")
    a, b = connect(relay), connect(relay)
    a.subscribe(ch, auth(relay, a, ch))
    b.subscribe(ch, auth(relay, b, ch))
    # start right after a second boundary of the (shared) monotonic clock the server counts in
    now = time.monotonic()
    time.sleep(1.02 - (now - int(now)))
    frames = b"".join(build_frame(json.dumps({"event": "client-n", "channel": ch, "data": {"i": i}}))
                      for i in range(11))
    a.send_raw(frames)
    e = a.expect("pusher:error")
    assert e["data"]["code"] == 4301
    got = [b.expect("client-n", ch)["data"]["i"] for _ in range(10)]
    assert got == list(range(10))
    b.nothing(0.2)
    still_open(a)  # 4301 is an error message, not a close
    time.sleep(1.0)
    a.send_json("client-n", {"i": "later"}, ch)
    assert b.expect("client-n", ch)["data"] == {"i": "later"}
    a.close()
    b.close()


def test_client_events_disabled(fresh_relay):
    r = fresh_relay({"FASTRELAY_APP_CLIENT_EVENTS": "false"})
    a, b = connect(r), connect(r)
    a.subscribe("private-x", auth(r, a, "private-x"))
    b.subscribe("private-x", auth(r, b, "private-x"))
    a.send_json("client-x", {}, "private-x")
    assert a.expect("pusher:error")["data"]["message"]
    b.nothing(0.2)


# ================================================================ sign-in and users


def test_signin_success(relay):
    with connect(relay) as ws:
        user_data = json.dumps({"id": "12345", "user_info": {"name": "Z"}})
        a = relay.pusher().authenticate_user(ws.socket_id, {"id": "12345", "user_info": {"name": "Z"}})
        ws.send_json("pusher:signin", {"auth": a["auth"], "user_data": a["user_data"]})
        msg = ws.expect("pusher:signin_success")
        assert json.loads(msg["data"]["user_data"]) == json.loads(user_data)
        still_open(ws)


@pytest.mark.parametrize("data", [
    {"auth": "{key}:" + "0" * 64, "user_data": '{"id":"1"}'},
    {"auth": "other:{sig}", "user_data": '{"id":"1"}'},
    {"user_data": '{"id":"1"}'},
    {"auth": "{key}:{sig}"},
])
def test_signin_bad_4009(relay, data):
    with connect(relay) as ws:
        sig = user_auth(relay, ws, '{"id":"1"}').partition(":")[2]
        d = {k: v.replace("{key}", relay.key).replace("{sig}", sig) for k, v in data.items()}
        ws.send_json("pusher:signin", d)
        ws.expect_error_close(4009)


def test_signin_user_data_without_id_4009(relay):
    with connect(relay) as ws:
        user_data = '{"name":"no id"}'
        ws.send_json("pusher:signin", {"auth": user_auth(relay, ws, user_data), "user_data": user_data})
        ws.expect_error_close(4009)


def test_server_to_user_channel(relay):
    user = uid("u")
    with connect(relay) as me, connect(relay) as other, connect(relay) as anon:
        signin(relay, me, {"id": user})
        signin(relay, other, {"id": uid("u")})
        me.subscribe(f"#server-to-user-{user}")
        for ws in (other, anon):
            ws.send_json("pusher:subscribe", {"channel": f"#server-to-user-{user}"})
            e = ws.expect("pusher:subscription_error", f"#server-to-user-{user}")
            assert e["data"]["type"] == "AuthError"
        relay.pusher().send_to_user(user, "note", {"hello": 1})
        ev = me.expect("note", f"#server-to-user-{user}")
        assert ev["data"] == {"hello": 1}
        other.nothing(0.1)
        anon.nothing(0.05)
        # client events are not allowed on it
        me.send_json("client-x", {}, f"#server-to-user-{user}")
        me.expect("pusher:error")


def test_terminate_user_connections(relay):
    user = uid("u")
    a, b, c = connect(relay), connect(relay), connect(relay)
    signin(relay, a, {"id": user})
    signin(relay, b, {"id": user})
    signin(relay, c, {"id": uid("u")})
    r = api(relay, "POST", f"/apps/{relay.app_id}/users/{user}/terminate_connections", {})
    assert r.status == 200 and r.json() == {}
    for ws in (a, b):
        f = ws.expect_close()
        assert f.close_code == 4009
    still_open(c)
    c.close()


def test_terminate_user_connections_python_sdk_path(relay):
    """pusher SDK 3.3.4 posts to /users/{id}/terminate_connections without /apps/{id}."""
    user = uid("u")
    with connect(relay) as a:
        signin(relay, a, {"id": user})
        relay.pusher().terminate_user_connections(user)
        assert a.expect_close().close_code == 4009


def test_watchlist_online_offline(relay):
    watcher_id, friend_id, early_id = uid("w"), uid("f"), uid("e")
    early = connect(relay)
    signin(relay, early, {"id": early_id})
    w = connect(relay)
    signin(relay, w, {"id": watcher_id, "watchlist": [friend_id, early_id]})
    ev = w.expect("pusher_internal:watchlist_events")
    assert ev["data"] == {"events": [{"name": "online", "user_ids": [early_id]}]}
    f1, f2 = connect(relay), connect(relay)
    signin(relay, f1, {"id": friend_id})
    ev = w.expect("pusher_internal:watchlist_events")
    assert ev["data"] == {"events": [{"name": "online", "user_ids": [friend_id]}]}
    signin(relay, f2, {"id": friend_id})  # a second connection is not a new "online"
    w.nothing(0.2)
    f1.close()
    w.nothing(0.3)
    f2.close()
    ev = w.expect("pusher_internal:watchlist_events")
    assert ev["data"] == {"events": [{"name": "offline", "user_ids": [friend_id]}]}
    early.close()
    assert w.expect("pusher_internal:watchlist_events")["data"]["events"][0]["name"] == "offline"
    w.close()


def test_watchlist_over_100_4302(relay):
    with connect(relay) as ws:
        user_data = json.dumps({"id": uid("u"), "watchlist": [str(i) for i in range(101)]})
        ws.send_json("pusher:signin", {"auth": user_auth(relay, ws, user_data), "user_data": user_data})
        e = ws.expect("pusher:error")
        assert e["data"]["code"] == 4302
        ws.expect("pusher:signin_success")
        still_open(ws)


# ================================================================ bad input


def test_malformed_json_keeps_connection(relay):
    with connect(relay) as ws:
        for bad in (b"{", b"not json", b"[1,2]", b"42", b'{"event":5}', b'{"data":{}}', b"", b'"str"'):
            ws.send_frame(bad)
            e = ws.expect("pusher:error")
            assert e["data"]["message"]
        still_open(ws)
    assert_alive(relay)


def test_unknown_events(relay):
    with connect(relay) as ws:
        ws.send_json("pusher:unknown", {})
        assert ws.expect("pusher:error")["data"]["message"]
        ws.send_json("my-event", {}, "somewhere")
        ws.expect("pusher:error")
        ws.send_json("pusher_internal:subscription_succeeded", {}, "x")
        ws.expect("pusher:error")
        still_open(ws)


BAD_FRAMES = [
    ("binary", build_frame(b'{"event":"pusher:ping"}', OP_BINARY), 1003),
    ("invalid utf-8", build_frame(b'{"event":"pusher:ping","data":"\xff\xfe"}'), 1007),
    ("invalid utf-8 not json", build_frame(b"\xc3\x28"), 1007),
    ("unmasked", build_frame('{"event":"pusher:ping"}', mask=False), 1002),
    ("rsv1", build_frame('{"event":"pusher:ping"}', rsv=0x40), 1002),
    ("rsv3", build_frame('{"event":"pusher:ping"}', rsv=0x10), 1002),
    ("opcode 3", build_frame(b"x", 3), 1002),
    ("opcode 11", build_frame(b"x", 11), 1002),
    ("ping > 125", build_frame(b"x" * 126, OP_PING), 1002),
    ("fragmented ping", build_frame(b"x", OP_PING, fin=False), 1002),
    ("continuation first", build_frame(b"x", OP_CONT), 1002),
    ("text inside fragments", build_frame(b"{", fin=False) + build_frame(b"}"), 1002),
    ("oversize declared", build_frame(b"", length=10_000_000), 1009),
    ("64-bit length with high bit", build_frame(b"", length=1 << 63), 1009),
    ("oversize fragments", build_frame(b"x" * 60_000, fin=False) + build_frame(b"x" * 60_000, OP_CONT), 1009),
]


@pytest.mark.parametrize("name,frame,code", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frames_close(relay, name, frame, code):
    with connect(relay) as ws:
        ws.send_raw(frame)
        f = ws.expect_close(timeout=1.5)
        assert f.close_code == code, (name, f.close_code, f.close_reason)
        ws.send_frame(struct.pack("!H", code), OP_CLOSE)
        assert ws.is_eof()
    assert_alive(relay)


def test_fragmented_message(relay):
    with connect(relay) as ws:
        msg = b'{"event":"pusher:ping","data":{}}'
        ws.send_raw(build_frame(msg[:5], fin=False) + build_frame(b"ping-in-between", OP_PING)
                    + build_frame(msg[5:20], OP_CONT, fin=False) + build_frame(msg[20:], OP_CONT))
        f = ws.recv_frame()
        assert f.opcode == OP_PONG and f.payload == b"ping-in-between"
        ws.expect("pusher:pong")


def test_split_frames_across_reads(relay):
    """Frames cut at every byte boundary still parse (the input buffer path)."""
    with connect(relay) as ws:
        data = build_frame('{"event":"pusher:ping","data":{}}') + build_frame(b"x" * 300, OP_PING)
        for i in range(len(data)):
            ws.send_raw(data[i:i + 1])
            if i % 7 == 0:
                time.sleep(0.001)
        ws.expect("pusher:pong")
        f = ws.expect_close()  # a 300-byte ping is a protocol error, even when trickled in
        assert f.close_code == 1002


def test_large_but_allowed_message(relay):
    ch = uid("private-")
    a, b = connect(relay), connect(relay)
    a.subscribe(ch, auth(relay, a, ch))
    b.subscribe(ch, auth(relay, b, ch))
    blob = "y" * 9000  # 16-bit length frame on the way in and out
    a.send_json("client-big", {"blob": blob}, ch)
    assert b.expect("client-big", ch)["data"]["blob"] == blob
    # over the app's 10 KB event limit: refused, connection open
    a.send_json("client-big", {"blob": "z" * 11000}, ch)
    a.expect("pusher:error")
    b.nothing(0.2)
    a.close()
    b.close()


@pytest.mark.parametrize("payload,echo", [
    (struct.pack("!H", 1000), 1000),
    (struct.pack("!H", 4000) + b"bye", 4000),
    (b"", 1000),
    (b"\x03", 1002),  # one byte: invalid
    (struct.pack("!H", 1005), 1002),  # reserved, never on the wire
    (struct.pack("!H", 999), 1002),
    (struct.pack("!H", 5000), 1002),
])
def test_client_close_is_echoed(relay, payload, echo):
    ws = connect(relay)
    ws.send_frame(payload, OP_CLOSE)
    f = ws.expect_close()
    assert f.close_code == echo
    assert ws.is_eof()


def test_client_close_leaves_channels(relay):
    ch = uid("presence-")
    a, b = connect(relay), connect(relay)
    join_presence(relay, a, ch, "a")
    join_presence(relay, b, ch, "b")
    a.expect("pusher_internal:member_added", ch)
    b.send_frame(struct.pack("!H", 1000), OP_CLOSE)
    b.expect_close()
    assert a.expect("pusher_internal:member_removed", ch)["data"] == {"user_id": "b"}
    a.close()


def test_abrupt_disconnect_leaves_channels(relay):
    ch = uid("presence-")
    a, b = connect(relay), connect(relay)
    join_presence(relay, a, ch, "a")
    join_presence(relay, b, ch, "b")
    a.expect("pusher_internal:member_added", ch)
    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.sock.close()  # RST, no close frame
    assert a.expect("pusher_internal:member_removed", ch)["data"] == {"user_id": "b"}
    a.close()
