"""Bounded fuzzing with hypothesis.

Two targets:
- ONE live server (module-scoped) fed random bytes, structured-but-broken HTTP requests, signed
  API requests with random JSON bodies, WebSocket frame sequences and Pusher messages. After each
  test the server must be alive (/up 200, a fresh client gets connection_established), no
  answer may be a 500 or a pusher:error "internal error", and the server log must hold no
  traceback (an exception anywhere in a handler is a bug, even if it was caught).
- the compiled core in-process, with no socket (tests/fuzz/harness.py): `Conn.data_received`
  on arbitrary chunks must never raise, and the pure functions (`parse_query`, `unquote`,
  `encode_frame`) keep their properties.

Each test is capped at ~200 examples and the sends use EOF instead of timeouts, so the file runs
in a few seconds. tests/fuzz/ has an atheris harness for longer runs.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import start_relay, stop_relay
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from wsclient import OP_CLOSE, OP_PONG, OP_TEXT, build_frame, connect, http, parse_frame, signed_path, up

from fastrelay import _core

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from harness import Harness  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SMALL = settings(FUZZ, max_examples=100)

ALLOWED_STATUSES = {100, 101, 200, 400, 401, 403, 404, 405, 408, 411, 413, 426, 431}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    r = start_relay(tmp_path_factory.mktemp("fuzz"), {
        "FASTRELAY_MAX_MESSAGE_SIZE": "4096",
        "FASTRELAY_MAX_BODY_SIZE": "65536",
        "FASTRELAY_REQUEST_TIMEOUT": "2",
        "FASTRELAY_SWEEP_INTERVAL": "0.5",
    })
    yield r
    stop_relay(r)


@pytest.fixture
def healthy(server):
    """Runs the test, then checks the server survived it and logged no exception."""
    offset = len(server.log())
    yield server
    assert up(server), "the server stopped answering /up"
    ws = connect(server)
    ws.send_json("pusher:ping", {})
    ws.expect("pusher:pong")
    ws.close()
    new_log = server.log()[offset:]
    for marker in ("Traceback", "Fatal error", "handler failed"):
        assert marker not in new_log, f"server logged an exception:\n{new_log[-3000:]}"


# ---------------------------------------------------------------- transport helpers


def exchange(server, data: bytes, timeout: float = 2.0) -> bytes:
    """Sends data, half-closes, and reads everything until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def http_statuses(raw: bytes) -> list[int]:
    """Status codes of the responses in raw (bodies skipped by Content-Length)."""
    out = []
    buf = raw
    while buf.startswith(b"HTTP/1.1 "):
        head, sep, rest = buf.partition(b"\r\n\r\n")
        assert sep, raw[:300]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        out.append(status)
        if status == 101:
            break
        n = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                n = int(v)
        assert len(rest) >= n, raw[:300]
        if status >= 400 and n:
            body = json.loads(rest[:n])
            assert isinstance(body.get("error"), str)
        buf = rest[n:]
    assert buf == b"" or out and out[-1] == 101, f"junk after responses: {buf[:200]!r}"
    return out


def server_frames(raw: bytes) -> list:
    frames = []
    buf = bytearray(raw)
    while buf:
        got = parse_frame(buf)
        assert got is not None, f"truncated server frame: {bytes(buf[:50])!r}"
        f, used = got
        del buf[:used]
        assert not f.masked and f.rsv == 0 and f.fin, f
        assert f.opcode in (OP_TEXT, OP_CLOSE, OP_PONG), f
        if f.opcode == OP_TEXT:
            msg = json.loads(f.payload)
            assert isinstance(msg.get("event"), str)
            assert "internal error" not in f.text, f.text
        if f.opcode == OP_CLOSE:
            code = f.close_code
            assert code is not None and (1000 <= code <= 1003 or 1007 <= code <= 1011
                                         or 3000 <= code <= 4999), code
        frames.append(f)
    return frames


def upgrade_request(key: str, query: str = "protocol=7") -> bytes:
    return (f"GET /app/{key}?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def ws_exchange(server, frames: bytes) -> list:
    """Upgrades, sends frames then a clean close, half-closes; returns the server's frames."""
    bye = build_frame(struct.pack("!H", 1000), OP_CLOSE)
    raw = exchange(server, upgrade_request(server.key) + frames + bye)
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), raw[:200]
    return server_frames(rest)


# ---------------------------------------------------------------- strategies

latin1 = st.characters(max_codepoint=255, exclude_characters="\r\n")
token = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1,
                max_size=12)
KEY_PATHS = ["/up", "/ready", "/app/test-key", "/app/test-key?protocol=7", "/apps/100001/events",
             "/apps/100001/batch_events", "/apps/100001/channels", "/apps/100001/channels/x",
             "/apps/100001/channels/presence-x/users", "/apps/100001/users/u/terminate_connections",
             "/apps/", "/apps/x/", "/", "*", "/app/", "/apps/100001/channels/%zz"]
HEADER_NAMES = ["Content-Length", "Transfer-Encoding", "Upgrade", "Connection", "Sec-WebSocket-Key",
                "Sec-WebSocket-Version", "Expect", "Host", "Origin", "X-Other"]
HEADER_VALUES = ["0", "5", "-1", "99999999", "1e3", "chunked", "websocket", "Upgrade", "close",
                 "keep-alive", "13", "dGhlIHNhbXBsZSBub25jZQ==", "100-continue", ""]


@st.composite
def http_request(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "get"]) | token)
    tail = draw(st.text(latin1, max_size=20).filter(lambda t: " " not in t))
    path = draw(st.sampled_from(KEY_PATHS)) + tail
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0",
                                    "http/1.1", ""]))
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES) | token,
                                      st.sampled_from(HEADER_VALUES) | st.text(latin1, max_size=20)),
                            max_size=6))
    body = draw(st.binary(max_size=64))
    head = f"{method} {path} {version}{eol}" + "".join(f"{k}: {v}{eol}" for k, v in headers) + eol
    return head.encode("latin-1") + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
channel_names = st.sampled_from(["c", "private-c", "presence-c", "private-encrypted-c", "cache-c",
                                 "presence-cache-c", "#server-to-user-1", "", "bad name"]) | st.text(
                                     max_size=30)


@st.composite
def pusher_message(draw) -> dict:
    event = draw(st.sampled_from(["pusher:subscribe", "pusher:unsubscribe", "pusher:signin", "pusher:ping",
                                  "pusher:pong", "client-x", "pusher:other", "x"]) | st.text(max_size=20))
    msg: dict = {"event": event}
    kind = draw(st.integers(0, 3))
    if kind == 0:
        msg["data"] = draw(json_values)
    elif kind == 1:
        msg["data"] = {"channel": draw(channel_names), "auth": draw(st.text(max_size=80) | json_values),
                       "channel_data": draw(st.text(max_size=80) | json_values),
                       "user_data": draw(st.text(max_size=60) | json_values)}
    elif kind == 2:
        msg["data"] = json.dumps(draw(json_values))
    if draw(st.booleans()):
        msg["channel"] = draw(channel_names | json_values)
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2))
    return {**extra, **msg}


@st.composite
def ws_frame(draw) -> bytes:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=16))  # raw garbage
    if choice <= 4:
        payload = json.dumps(draw(pusher_message())).encode()
    else:
        payload = draw(st.binary(max_size=140))
    opcode = draw(st.sampled_from([0, 1, 1, 1, 2, 8, 9, 10]) | st.integers(0, 15))
    if opcode == 8 and draw(st.booleans()):
        payload = struct.pack("!H", draw(st.integers(0, 65535))) + payload[:20]
    length = draw(st.none() | st.none() | st.none() | st.integers(0, 2**63 + 5))
    if length is not None and length > len(payload) + 64:
        length = None if draw(st.booleans()) else length  # lying lengths only sometimes
    return build_frame(payload, opcode, fin=draw(st.booleans() | st.just(True)),
                       mask=draw(st.sampled_from([True, True, True, False])),
                       rsv=draw(st.sampled_from([0, 0, 0, 0, 0x40, 0x20, 0x10])), length=length)


# ---------------------------------------------------------------- against the live server


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(healthy, data):
    for status in http_statuses(exchange(healthy, data)):
        assert status in ALLOWED_STATUSES, status


@FUZZ
@given(reqs=st.lists(http_request(), min_size=1, max_size=3))
def test_broken_http_requests(healthy, reqs):
    raw = exchange(healthy, b"".join(reqs))
    if raw.startswith(b"HTTP/1.1 101"):
        return  # a fuzzed request happened to be a valid upgrade
    for status in http_statuses(raw):
        assert status in ALLOWED_STATUSES, (status, reqs)


ROUTES = [("POST", "events"), ("POST", "batch_events"), ("GET", "channels"), ("GET", "channels/x"),
          ("GET", "channels/presence-x/users"), ("POST", "users/u1/terminate_connections")]


@FUZZ
@given(route=st.sampled_from(ROUTES),
       body=st.one_of(
           json_values,
           st.fixed_dictionaries({}, optional={
               "name": st.text(max_size=210) | json_values, "data": st.text(max_size=50) | json_values,
               "channel": channel_names | json_values,
               "channels": st.lists(channel_names, max_size=5) | json_values,
               "socket_id": st.sampled_from(["1.1", "x", ""]) | json_values,
               "info": st.sampled_from(["user_count", "subscription_count", "cache", ""]) | json_values}),
           st.fixed_dictionaries({"batch": st.lists(st.dictionaries(
               st.sampled_from(["name", "channel", "data", "socket_id", "info"]), json_values | channel_names,
               max_size=5), max_size=12) | json_values})),
       params=st.dictionaries(st.sampled_from(["info", "filter_by_prefix", "x"]),
                              st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                                    exclude_characters="&=#%+ "), max_size=20), max_size=2))
def test_signed_api_requests(healthy, route, body, params):
    """Correctly signed requests with random bodies: every answer is a deliberate one."""
    method, tail = route
    raw = b"" if method == "GET" else json.dumps(body).encode()
    path = f"/apps/{healthy.app_id}/{tail}"
    r = http(healthy, method, signed_path(healthy, method, path, raw, params), raw)
    assert r.status in (200, 400, 413), (r.status, r.body, body, params)
    r.json()


@settings(FUZZ, max_examples=150)
@given(frames=st.lists(ws_frame(), min_size=1, max_size=5))
def test_websocket_frames(healthy, frames):
    ws_exchange(healthy, b"".join(frames))


@settings(FUZZ, max_examples=150)
@given(msgs=st.lists(pusher_message(), min_size=1, max_size=5))
def test_pusher_messages(healthy, msgs):
    frames = server_frames_for(healthy, msgs)
    # every message is answered or ignored; the connection is only closed by our close frame
    # or a refusal (sign-in with a bad signature: 4009)
    closes = [f.close_code for f in frames if f.opcode == OP_CLOSE]
    assert closes in ([1000], [4009]), closes


def server_frames_for(server, msgs: list[dict]) -> list:
    payload = b"".join(build_frame(json.dumps(m)) for m in msgs)
    return ws_exchange(server, payload)


@SMALL
@given(query=st.text(max_size=40), key=st.text(max_size=20))
def test_upgrade_queries(healthy, query, key):
    q = urllib.parse.quote(query, safe="=&")
    k = urllib.parse.quote(key, safe="") or "x"
    raw = exchange(healthy, upgrade_request(k, q) + build_frame(struct.pack("!H", 1000), OP_CLOSE))
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), raw[:200]
    frames = server_frames(rest)
    assert frames and frames[0].opcode == OP_TEXT
    first = json.loads(frames[0].payload)
    assert first["event"] in ("pusher:error", "pusher:connection_established")


# ---------------------------------------------------------------- in-process: the core, no socket


@FUZZ
@given(chunks=st.lists(st.binary(max_size=200), min_size=1, max_size=6), ws=st.booleans())
def test_core_data_received_never_raises(chunks, ws):
    h = Harness(max_frame=1024, max_header=512, max_body=256)
    try:
        h.feed_all(([upgrade_request("k")] if ws else []) + chunks)
    finally:
        h.close()


@FUZZ
@given(reqs=st.lists(http_request(), min_size=1, max_size=3))
def test_core_http_parser_never_raises(reqs):
    h = Harness(max_frame=1024, max_header=512, max_body=256)
    try:
        h.feed_all(reqs)
        for status in http_statuses(h.output_http()):
            assert status in ALLOWED_STATUSES | {101}
    finally:
        h.close()


@settings(FUZZ, max_examples=120)  # generation dominates; the live-server test covers more
@given(frames=st.lists(ws_frame(), min_size=1, max_size=5), split=st.sampled_from([7, 16, 64, 4096]))
def test_core_ws_parser_never_raises(frames, split):
    h = Harness(max_frame=1024)
    try:
        data = b"".join(frames)
        h.feed_all([upgrade_request("k")] + [data[i:i + split] for i in range(0, len(data), split)])
        server_frames(h.output_ws())
    finally:
        h.close()


@FUZZ
@given(msgs=st.lists(st.binary(max_size=300), min_size=1, max_size=4), split=st.integers(1, 40))
def test_core_messages_survive_any_split(msgs, split):
    """Valid frames cut anywhere arrive whole, in order, as the same bytes."""
    h = Harness(max_frame=1 << 16)
    try:
        data = b"".join(build_frame(m) for m in msgs)
        h.feed_all([upgrade_request("k")] + [data[i:i + split] for i in range(0, len(data), split)])
        assert h.messages == msgs
    finally:
        h.close()


@FUZZ
@given(s=st.text())
def test_unquote_and_parse_query_never_raise(s):
    out = _core.unquote(s)
    assert isinstance(out, str)
    q = _core.parse_query(s)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in q.items())


@FUZZ
@given(s=st.text(st.characters(codec="utf-8"), max_size=40))
def test_unquote_matches_urllib(s):
    assert _core.unquote(s) == urllib.parse.unquote_plus(s, errors="replace")


@FUZZ
@given(d=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=10), max_size=5))
def test_parse_query_round_trip(d):
    assert _core.parse_query(urllib.parse.urlencode(d)) == d


@FUZZ
@given(payload=st.one_of(st.binary(max_size=300), st.text(max_size=100),
                         st.builds(lambda n, b: bytes([b]) * n, st.integers(65530, 65540),
                                   st.integers(0, 255))),
       opcode=st.integers(0, 15))
def test_encode_frame_round_trip(payload, opcode):
    frame = _core.encode_frame(payload, opcode)
    got = parse_frame(frame)
    assert got is not None
    f, used = got
    assert used == len(frame)
    assert f.fin and f.opcode == opcode and not f.masked and f.rsv == 0
    assert f.payload == (payload.encode() if isinstance(payload, str) else payload)


def test_encode_frame_length_boundaries():
    for n in (0, 125, 126, 65535, 65536, 70000):
        frame = _core.encode_frame(b"a" * n)
        f, used = parse_frame(frame)
        assert len(f.payload) == n and used == len(frame)
        assert len(frame) - n == (2 if n < 126 else 4 if n < 65536 else 10)


@SMALL
@given(code=st.integers(1000, 4999), reason=st.text(max_size=200))
@example(code=1000, reason="a" + "é" * 100)  # 201 bytes: a cut at 120 splits a character
def test_encode_close(code, reason):
    f, _ = parse_frame(_core.encode_close(code, reason))
    assert f.opcode == OP_CLOSE and f.close_code == code
    assert len(f.payload) <= 125, "a control frame payload is at most 125 bytes"
    f.payload[2:].decode("utf-8")  # the reason, even cut, must stay valid UTF-8


@SMALL
@given(status=st.sampled_from([200, 202, 400, 404, 413, 429, 503, 599]),
       body=st.one_of(st.binary(max_size=64), st.binary(min_size=900, max_size=3000)),
       ctype=st.sampled_from([b"application/json", b"text/plain; charset=utf-8"]))
@example(status=200, body=b"", ctype=b"application/json")
def test_respond_bytes(status, body, ctype):
    """A keep-alive answer, assembled in C below ~1 KB and formatted above: the same bytes."""
    h = Harness()
    h.conn.respond(status, body, ctype, None, True)
    out = h.output_http()
    head, _, rest = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 %d " % status)
    assert lines[1:] == [b"Content-Type: " + ctype, b"Content-Length: %d" % len(body)]
    assert rest == body
    h.close()


def test_event_ids_sort_by_time():
    """27 lowercase hex digits: ms time, a sequence within the ms, the process's random bits."""
    ids = [_core.new_event_id() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for i in ids:
        assert len(i) == 27 and all(c in "0123456789abcdef" for c in i)
        assert i[17:] == ids[0][17:]  # one process: the same random bits
    assert abs(int(ids[0][:12], 16) - time.time() * 1000) < 5000
    same_ms = [i for i in ids if i[:12] == ids[-1][:12]]
    assert [int(i[12:17], 16) for i in same_ms] == list(range(int(same_ms[0][12:17], 16),
                                                              int(same_ms[0][12:17], 16) + len(same_ms)))
