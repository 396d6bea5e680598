"""The Pusher HTTP API and the HTTP/1.1 front door, over real sockets.

Two clients: the official `pusher` Python SDK (the well-formed path; it only takes numeric app
ids, as the fixture's is) and raw signed requests built with fastrelay.signatures (so the tests
can send what the SDK refuses to: 101 channels, stale timestamps, bad md5s, broken HTTP).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid

import pusher
import pytest
from wsclient import (
    api,
    build_frame,
    connect,
    http,
    join_presence,
    raw_http,
    read_http_response,
    signed_path,
    up,
)

from fastrelay._core import hmac_sha256_hex
from fastrelay.signatures import api_string_to_sign, sign_api_request, sign_channel


def uid(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


def events_path(relay) -> str:
    return f"/apps/{relay.app_id}/events"


def assert_error(r, status: int, contains: str = "") -> None:
    assert r.status == status, (r.status, r.body)
    assert r.headers.get("content-type") == "application/json"
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert contains.lower() in body["error"].lower(), body


# ================================================================ triggering


def test_trigger_one_channel_sdk(relay):
    ch = uid("pub-")
    with connect(relay) as ws:
        ws.subscribe(ch)
        assert relay.pusher().trigger(ch, "ev", {"a": 1}) == {}
        msg = ws.expect("ev", ch)
        assert msg["raw_data"] == '{"a": 1}'


def test_trigger_raw_string_data_and_single_channel_field(relay):
    ch = uid("pub-")
    with connect(relay) as ws:
        ws.subscribe(ch)
        r = api(relay, "POST", events_path(relay), {"name": "ev", "channel": ch, "data": "hello"})
        assert r.status == 200 and r.json() == {}
        assert ws.expect("ev", ch)["raw_data"] == "hello"
        # non-string data is JSON-encoded into the string form
        r = api(relay, "POST", events_path(relay), {"name": "ev", "channels": [ch], "data": {"k": [1]}})
        assert r.status == 200
        assert json.loads(ws.expect("ev", ch)["raw_data"]) == {"k": [1]}


def test_trigger_100_channels_and_101(relay):
    base = uid("m-")
    chans = [f"{base}-{i}" for i in range(100)]
    with connect(relay) as ws:
        for ch in chans:
            ws.send_json("pusher:subscribe", {"channel": ch})
        for ch in chans:
            ws.expect("pusher_internal:subscription_succeeded", ch)
        r = api(relay, "POST", events_path(relay), {"name": "wide", "channels": chans, "data": "x"})
        assert r.status == 200, r.body
        got = {ws.expect("wide")["channel"] for _ in range(100)}
        assert got == set(chans)
        r = api(relay, "POST", events_path(relay),
                {"name": "wide", "channels": chans + [base + "-x"], "data": "x"})
        assert_error(r, 400, "100")
        ws.nothing(0.2)


def test_batch_10_and_11(relay):
    ch = uid("pub-")
    p = relay.pusher()
    with connect(relay) as ws:
        ws.subscribe(ch)
        batch = [{"channel": ch, "name": f"e{i}", "data": str(i)} for i in range(10)]
        assert p.trigger_batch(batch) == {}
        assert [ws.expect(f"e{i}", ch)["raw_data"] for i in range(10)] == [str(i) for i in range(10)]
        r = api(relay, "POST", f"/apps/{relay.app_id}/batch_events",
                {"batch": batch + [{"channel": ch, "name": "e10", "data": "10"}]})
        assert_error(r, 400, "10")
        for bad in ({"batch": []}, {"batch": "x"}, {}, {"batch": [1]}, {"batch": [{"channel": ch}]}):
            r = api(relay, "POST", f"/apps/{relay.app_id}/batch_events", bad)
            assert_error(r, 400)
        ws.nothing(0.2)


def test_socket_id_exclusion(relay):
    ch = uid("pub-")
    a, b = connect(relay), connect(relay)
    a.subscribe(ch)
    b.subscribe(ch)
    relay.pusher().trigger(ch, "ev", "x", socket_id=a.socket_id)
    b.expect("ev", ch)
    a.nothing(0.2)
    # in a batch too
    r = api(relay, "POST", f"/apps/{relay.app_id}/batch_events",
            {"batch": [{"channel": ch, "name": "b", "data": "1", "socket_id": b.socket_id}]})
    assert r.status == 200
    a.expect("b", ch)
    b.nothing(0.2)
    for bad in ("abc", "1.2.3", "1", 12, "1.2\n", "\u0661.\u0662"):  # a final newline, Arabic digits
        r = api(relay, "POST", events_path(relay),
                {"name": "e", "channel": ch, "data": "x", "socket_id": bad})
        assert_error(r, 400, "socket_id")
    a.close()
    b.close()


def test_trigger_info(relay):
    pres, pub = uid("presence-"), uid("pub-")
    a, b = connect(relay), connect(relay)
    join_presence(relay, a, pres, "u1")
    join_presence(relay, b, pres, "u2")
    a.expect("pusher_internal:member_added", pres)
    a.subscribe(pub)
    r = api(relay, "POST", events_path(relay),
            {"name": "e", "channels": [pres, pub], "data": "x", "info": "user_count,subscription_count"})
    assert r.status == 200
    assert r.json() == {"channels": {pres: {"user_count": 2, "subscription_count": 2},
                                     pub: {"subscription_count": 1}}}
    r = api(relay, "POST", f"/apps/{relay.app_id}/batch_events", {"batch": [
        {"channel": pub, "name": "e", "data": "x", "info": "subscription_count"},
        {"channel": pres, "name": "e", "data": "x", "info": "user_count"},
        {"channel": pub, "name": "e", "data": "x"},
    ]})
    assert r.status == 200
    assert r.json() == {"batch": [{"subscription_count": 1}, {"user_count": 2}, {}]}
    r = api(relay, "POST", events_path(relay), {"name": "e", "channel": pub, "data": "x", "info": "bogus"})
    assert_error(r, 400)
    a.close()
    b.close()


def test_trigger_validation(relay):
    ch = uid("pub-")
    p = events_path(relay)
    cases = [
        ({"channel": ch, "data": "x"}, 400),                      # no name
        ({"name": "", "channel": ch, "data": "x"}, 400),
        ({"name": "e" * 201, "channel": ch, "data": "x"}, 400),
        ({"name": "e", "channel": ch}, 400),                      # no data
        ({"name": "e", "data": "x"}, 400),                        # no channel
        ({"name": "e", "channels": [], "data": "x"}, 400),
        ({"name": "e", "channels": ch, "data": "x"}, 400),        # a string, not a list
        ({"name": "e", "channels": ["bad name"], "data": "x"}, 400),
        ({"name": "e", "channels": [ch + "\n"], "data": "x"}, 400),   # a final newline
        ({"name": "e", "channels": ["caf\u00e9"], "data": "x"}, 400),
        ({"name": "e", "channels": [5], "data": "x"}, 400),
        ({"name": "e", "channel": ch, "data": "x", "info": 5}, 400),
    ]
    for body, status in cases:
        assert_error(api(relay, "POST", p, body), status)
    assert_error(api(relay, "POST", p, b"not json"), 400, "JSON")
    assert_error(api(relay, "POST", p, b"[1,2]"), 400)
    assert api(relay, "POST", p, {"name": "e" * 200, "channel": ch, "data": "x"}).status == 200


def test_data_size_limit(relay):
    ch = uid("pub-")
    with connect(relay) as ws:
        ws.subscribe(ch)
        ok = "d" * 10240
        assert api(relay, "POST", events_path(relay), {"name": "e", "channel": ch, "data": ok}).status == 200
        assert ws.expect("e", ch)["raw_data"] == ok  # a 64 KB-class frame round trip
        r = api(relay, "POST", events_path(relay), {"name": "e", "channel": ch, "data": ok + "d"})
        assert_error(r, 413)
        ws.nothing(0.2)


def test_encrypted_channels(relay):
    enc, pub = uid("private-encrypted-"), uid("pub-")
    payload = json.dumps({"ciphertext": "abc", "nonce": "def"})
    with connect(relay) as ws:
        ws.subscribe(enc, sign_channel(relay.key, relay.secret, ws.socket_id, enc))
        r = api(relay, "POST", events_path(relay), {"name": "e", "channel": enc, "data": payload})
        assert r.status == 200
        assert ws.expect("e", enc)["raw_data"] == payload  # relayed opaque
        r = api(relay, "POST", events_path(relay), {"name": "e", "channels": [enc, pub], "data": payload})
        assert_error(r, 400, "encrypted")
        ws.nothing(0.2)


# ================================================================ queries


def test_channels_listing(relay):
    tag = uid()
    pres, pub = f"presence-{tag}", f"pub-{tag}"
    a = connect(relay)
    join_presence(relay, a, pres, "u1")
    a.subscribe(pub)
    p = relay.pusher()
    listing = p.channels_info()["channels"]
    assert pres in listing and pub in listing and listing[pub] == {}
    assert p.channels_info(prefix_filter=f"pub-{tag}") == {"channels": {pub: {}}}
    assert p.channels_info(prefix_filter=f"presence-{tag}", attributes=["user_count"]) == {
        "channels": {pres: {"user_count": 1}}}
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels",
            params={"filter_by_prefix": "pub-", "info": "user_count"})
    assert_error(r, 400, "presence")
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels", params={"info": "user_count"})
    assert_error(r, 400)
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels", params={"info": "bogus"})
    assert_error(r, 400)
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels",
            params={"filter_by_prefix": f"pub-{tag}", "info": "subscription_count"})
    assert r.status == 200 and r.json() == {"channels": {pub: {"subscription_count": 1}}}
    a.close()
    time.sleep(0.1)
    assert p.channels_info(prefix_filter=f"pub-{tag}") == {"channels": {}}  # occupied ones only


def test_channel_info(relay):
    pres, pub, cache = uid("presence-"), uid("pub-"), uid("cache-")
    p = relay.pusher()
    a, b = connect(relay), connect(relay)
    join_presence(relay, a, pres, "u1")
    join_presence(relay, b, pres, "u1")  # same user twice
    a.subscribe(pub)
    assert p.channel_info(pres, ["user_count", "subscription_count"]) == {
        "occupied": True, "user_count": 1, "subscription_count": 2}
    assert p.channel_info(pub, ["subscription_count"]) == {"occupied": True, "subscription_count": 1}
    assert p.channel_info(uid("pub-")) == {"occupied": False}
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels/{pub}", params={"info": "user_count"})
    assert_error(r, 400, "presence")
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels/{pub}", params={"info": "bogus"})
    assert_error(r, 400)
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels/bad%20name")
    assert_error(r, 400)
    # cache
    assert p.channel_info(cache, ["cache"]) == {"occupied": False}
    p.trigger(cache, "cached-ev", "payload")
    info = p.channel_info(cache, ["cache"])
    assert info["occupied"] is False
    assert info["cache"]["event"] == "cached-ev" and info["cache"]["data"] == "payload"
    assert 0 < info["cache"]["ttl"] <= 1800
    a.close()
    b.close()


def test_users(relay):
    pres, pub = uid("presence-"), uid("pub-")
    a, b = connect(relay), connect(relay)
    join_presence(relay, a, pres, "u1")
    join_presence(relay, b, pres, "u2")
    users = relay.pusher().users_info(pres)
    assert sorted(u["id"] for u in users["users"]) == ["u1", "u2"]
    assert relay.pusher().users_info(uid("presence-")) == {"users": []}
    r = api(relay, "GET", f"/apps/{relay.app_id}/channels/{pub}/users")
    assert_error(r, 400, "presence")
    a.close()
    b.close()


def test_terminate_unknown_user(relay):
    r = api(relay, "POST", f"/apps/{relay.app_id}/users/nobody/terminate_connections", {})
    assert r.status == 200 and r.json() == {}


# ================================================================ signatures


def test_signature_errors(relay):
    ch = uid("pub-")
    path = events_path(relay)
    body = json.dumps({"name": "e", "channel": ch, "data": "x"}).encode()
    md5 = hashlib.md5(body).hexdigest()

    def send(q: dict[str, str]) -> object:
        return http(relay, "POST", path + "?" + "&".join(f"{k}={v}" for k, v in q.items()), body)

    good = sign_api_request(relay.key, relay.secret, "POST", path, body)
    assert send(good).status == 200

    bad_sig = dict(good, auth_signature="0" * 64)
    assert_error(send(bad_sig), 401, "signature")
    # stale (and future) timestamps, correctly signed
    for ts in (int(time.time()) - 601, int(time.time()) + 700):
        q = sign_api_request(relay.key, relay.secret, "POST", path, body, timestamp=ts)
        assert_error(send(q), 401, "timestamp")
    q = sign_api_request(relay.key, relay.secret, "POST", path, body, timestamp=int(time.time()) - 500)
    assert send(q).status == 200  # inside the window
    # body_md5 missing / mismatched (signed consistently, so only the md5 is wrong)
    q = sign_api_request(relay.key, relay.secret, "POST", path, b"")
    assert_error(send(q), 401, "body_md5")
    q = sign_api_request(relay.key, relay.secret, "POST", path, b"", params={"body_md5": "0" * 32})
    assert_error(send(q), 401, "body_md5")
    q = sign_api_request(relay.key, relay.secret, "POST", path, b"", params={"body_md5": md5.upper()})
    assert send(q).status == 200  # hex in either case
    # wrong key, wrong secret, no signature, no timestamp, other auth_version
    assert_error(send(sign_api_request("other", relay.secret, "POST", path, body)), 401)
    assert_error(send(sign_api_request(relay.key, "wrong", "POST", path, body)), 401)
    assert_error(send({k: v for k, v in good.items() if k != "auth_signature"}), 401)
    assert_error(send({k: v for k, v in good.items() if k != "auth_timestamp"}), 401)
    q = dict(good, auth_version="2.0")
    q["auth_signature"] = hmac_sha256_hex(relay.secret.encode(),
                                          api_string_to_sign("POST", path, q).encode())
    assert_error(send(q), 401, "auth_version")
    # a signature over another path or method does not transfer
    q = sign_api_request(relay.key, relay.secret, "POST", f"/apps/{relay.app_id}/batch_events", body)
    assert_error(send(q), 401)
    # the SDK with a wrong secret
    bad = pusher.Pusher(app_id=relay.app_id, key=relay.key, secret="nope", host=relay.host,
                        port=relay.port, ssl=False)
    with pytest.raises(pusher.errors.PusherBadAuth):
        bad.trigger(ch, "e", "x")
    assert up(relay)


def test_non_ascii_timestamp_is_401_not_500(relay):
    # '²' passes str.isdigit() but not int()
    path = f"/apps/{relay.app_id}/channels"
    r = http(relay, "GET", f"{path}?auth_key={relay.key}&auth_timestamp=%C2%B2&auth_version=1.0"
                           f"&auth_signature=00")
    assert_error(r, 401)


def test_signature_with_encoded_query_values(relay):
    """Values are signed decoded (the SDKs sign before URL-encoding): %2C is a comma."""
    path = f"/apps/{relay.app_id}/channels"
    q = sign_api_request(relay.key, relay.secret, "GET", path,
                         params={"filter_by_prefix": "presence-", "info": "user_count"})
    qs = "&".join(f"{k}={v.replace(',', '%2C')}" for k, v in q.items())
    r = http(relay, "GET", f"{path}?{qs}")
    assert r.status == 200, r.body


def test_unknown_app_and_routes(relay):
    assert_error(api(relay, "POST", "/apps/999999/events", {"name": "e", "channel": "c", "data": "x"}), 404)
    assert_error(http(relay, "GET", "/apps/999999/channels"), 404)
    assert_error(http(relay, "GET", "/nope"), 404)
    assert_error(http(relay, "GET", "/apps/"), 404)
    assert_error(api(relay, "GET", f"/apps/{relay.app_id}/nope"), 404)
    assert_error(api(relay, "GET", f"/apps/{relay.app_id}/channels/a/b/c"), 404)
    # wrong methods on known routes
    assert_error(api(relay, "GET", events_path(relay)), 405)
    assert_error(api(relay, "DELETE", f"/apps/{relay.app_id}/channels"), 405)
    assert_error(api(relay, "POST", f"/apps/{relay.app_id}/channels", {}), 405)
    assert_error(api(relay, "PUT", f"/apps/{relay.app_id}/batch_events", {}), 405)


def test_disabled_app_403(fresh_relay):
    r = fresh_relay({"FASTRELAY_APP_ENABLED": "false"})
    resp = api(r, "POST", events_path(r), {"name": "e", "channel": "c", "data": "x"})
    assert_error(resp, 403)


def test_health(relay):
    r = http(relay, "GET", "/up")
    assert r.status == 200 and r.body == b"OK"
    r = http(relay, "GET", "/ready")
    assert r.status == 200 and r.json() == {"ready": True}


# ================================================================ HTTP/1.1


def test_keep_alive_sequential(relay):
    ch = uid("pub-")
    with socket.create_connection((relay.host, relay.port), timeout=3) as s:
        buf = bytearray()
        for i in range(5):
            body = json.dumps({"name": f"e{i}", "channel": ch, "data": "x"}).encode()
            path = signed_path(relay, "POST", events_path(relay), body)
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            s.sendall(head.encode() + body)
            r = read_http_response(s, buf)
            assert r.status == 200 and r.json() == {}
            assert "close" not in r.headers.get("connection", "").lower()
        s.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_http_response(s, buf).body == b"OK"


def test_keep_alive_pipelined(relay):
    ch = uid("pub-")
    reqs = []
    for i in range(6):
        body = json.dumps({"name": f"e{i}", "channel": ch, "data": "x"}).encode()
        path = signed_path(relay, "POST", events_path(relay), body)
        reqs.append(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    reqs.insert(3, b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
    reqs.insert(5, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")  # an error answer keeps the connection
    with connect(relay) as ws, socket.create_connection((relay.host, relay.port), timeout=3) as s:
        ws.subscribe(ch)
        s.sendall(b"".join(reqs))
        buf = bytearray()
        statuses = [read_http_response(s, buf).status for _ in reqs]
        assert statuses == [200, 200, 200, 200, 200, 404, 200, 200]
        assert [ws.expect(f"e{i}", ch)["event"] for i in range(6)] == [f"e{i}" for i in range(6)]
        # pipelined requests cut at odd places
        blob = b"".join(reqs[:3])
        for i in range(0, len(blob), 37):
            s.sendall(blob[i:i + 37])
            time.sleep(0.001)
        assert [read_http_response(s, buf).status for _ in range(3)] == [200, 200, 200]


def test_connection_close_and_http10(relay):
    with socket.create_connection((relay.host, relay.port), timeout=3) as s:
        s.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = read_http_response(s, bytearray())
        assert r.status == 200 and r.headers.get("connection") == "close"
        assert s.recv(10) == b""
    with socket.create_connection((relay.host, relay.port), timeout=3) as s:
        s.sendall(b"GET /up HTTP/1.0\r\n\r\n")
        r = read_http_response(s, bytearray())
        assert r.status == 200
        assert s.recv(10) == b""


def test_expect_100_continue(relay):
    ch = uid("pub-")
    body = json.dumps({"name": "e", "channel": ch, "data": "x"}).encode()
    path = signed_path(relay, "POST", events_path(relay), body)
    with socket.create_connection((relay.host, relay.port), timeout=3) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        buf = bytearray()
        assert read_http_response(s, buf, head_only=True).status == 100
        s.sendall(body)
        assert read_http_response(s, buf).status == 200


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /up\r\n\r\n", 400),
    (b"GET  /up HTTP/1.1\r\n\r\n", 400),
    (b"GET /up HTTP/2.0\r\n\r\n", 400),
    (b"GET /up FTP/1.1\r\n\r\n", 400),
    (b"GET /up HTTP/1.1\r\nno-colon-here\r\n\r\n", 400),
    (b"GET /up HTTP/1.1\r\n: empty-name\r\n\r\n", 400),
    (b"GET /up HTTP/1.1\r\nbad name: v\r\n\r\n", 400),
    (b"POST /up HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /up HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /up HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
    (b"POST /up HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    (b"POST /up HTTP/1.1\r\nContent-Length: 9999999999999\r\n\r\n", 400),
    (b"POST /up HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    (b"GET /up HTTP/1.1\r\n" + b"X-Many: v\r\n" * 101 + b"\r\n", 400),
    (b"GET /up HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 17000, 431),  # no end of headers in sight
], ids=lambda v: v[:30].decode("latin-1") if isinstance(v, bytes) else str(v))
def test_bad_http(relay, raw, status):
    r = raw_http(relay.host, relay.port, raw)
    assert_error(r, status)
    assert up(relay)


def test_content_length_non_ascii_digit_is_400(relay):
    # 'Content-Length: ²' (latin-1 0xB2) passes str.isdigit() but int() raises
    r = raw_http(relay.host, relay.port, b"POST /up HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")
    assert_error(r, 400)
    assert up(relay)


def test_body_limit_setting(fresh_relay):
    r = fresh_relay({"FASTRELAY_MAX_BODY_SIZE": "1000"})
    body = json.dumps({"name": "e", "channel": "c", "data": "x" * 990}).encode()
    assert_error(api(r, "POST", events_path(r), body), 413)
    body = json.dumps({"name": "e", "channel": "c", "data": "x" * 900}).encode()
    assert api(r, "POST", events_path(r), body).status == 200


def test_slowloris_408(fresh_relay):
    r = fresh_relay({"FASTRELAY_REQUEST_TIMEOUT": "0.5", "FASTRELAY_SWEEP_INTERVAL": "0.2"})
    with socket.create_connection((r.host, r.port), timeout=3) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        s.sendall(b"X-Slow: 1\r\n")  # trickling does not reset the request clock
        resp = read_http_response(s, bytearray(), timeout=3)
        assert resp.status == 408
        assert 0.4 < time.monotonic() - t0 < 2.0
    # a partial body too
    with socket.create_connection((r.host, r.port), timeout=3) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        assert read_http_response(s, bytearray(), timeout=3).status == 408
    # an idle keep-alive connection between requests is not a slow request
    with socket.create_connection((r.host, r.port), timeout=3) as s:
        buf = bytearray()
        s.sendall(b"GET /up HTTP/1.1\r\n\r\n")
        assert read_http_response(s, buf).status == 200
        time.sleep(0.9)
        s.sendall(b"GET /up HTTP/1.1\r\n\r\n")
        assert read_http_response(s, buf).status == 200
    assert up(r)


def test_websocket_frames_on_http_connection(relay):
    """WebSocket bytes on a plain HTTP connection are just a bad request."""
    r = raw_http(relay.host, relay.port, build_frame('{"event":"pusher:ping"}') + b"\r\n\r\n")
    assert_error(r, 400)
