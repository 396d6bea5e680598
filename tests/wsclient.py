"""A small raw test client: blocking sockets, hand-built frames, exact close codes.

It speaks just enough HTTP/1.1 and WebSocket (RFC 6455) to drive the server both ways: the
well-formed path (`connect()` returns a client that has read pusher:connection_established)
and the broken one (`WS.send_frame(..., mask=False, rsv=0x40, length=...)`), so the tests can
assert the server's exact answers: pusher:error codes, close codes, HTTP statuses.

Everything is blocking with short timeouts: the tests are sequential scripts, and a read that
times out is itself an assertion ("nothing arrived").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from fastrelay._core import hmac_sha256_hex
from fastrelay.signatures import sign_api_request, sign_channel

DEFAULT_TIMEOUT = 3.0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class Closed(Exception):
    """The peer closed the TCP connection."""


# ---------------------------------------------------------------- frames


def build_frame(payload: bytes | str, opcode: int = OP_TEXT, *, fin: bool = True, mask: bool = True,
                rsv: int = 0, length: int | None = None, mask_key: bytes | None = None) -> bytes:
    """One client frame. `length` overrides the declared payload length (to lie about it);
    `rsv` is ORed into the first byte (0x40, 0x20, 0x10 are RSV1-3)."""
    data = payload.encode() if isinstance(payload, str) else payload
    n = len(data) if length is None else length
    head = bytearray([(0x80 if fin else 0) | rsv | (opcode & 0x0F)])
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + data
    key = mask_key if mask_key is not None else os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(data))
    return bytes(head) + key + masked


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    rsv: int = 0
    masked: bool = False

    @property
    def text(self) -> str:
        return self.payload.decode()

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return struct.unpack("!H", self.payload[:2])[0]

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8", "replace")


def parse_frame(buf: bytes | bytearray) -> tuple[Frame, int] | None:
    """Parses one frame (masked or not) from the start of buf: (frame, bytes used), or None
    when buf does not yet hold a whole frame."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack("!H", bytes(buf[2:4]))[0]
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack("!Q", bytes(buf[2:10]))[0]
        pos = 10
    masked = bool(b1 & 0x80)
    key = b""
    if masked:
        if len(buf) < pos + 4:
            return None
        key = bytes(buf[pos:pos + 4])
        pos += 4
    if len(buf) < pos + n:
        return None
    payload = bytes(buf[pos:pos + n])
    if masked:
        payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return Frame(bool(b0 & 0x80), b0 & 0x0F, payload, b0 & 0x70, masked), pos + n


# ---------------------------------------------------------------- HTTP


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def read_http_response(sock: socket.socket, buf: bytearray, timeout: float = DEFAULT_TIMEOUT,
                       head_only: bool = False) -> Response:
    """Reads one response from sock (using and leaving leftovers in buf)."""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        _fill(sock, buf, deadline)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    del buf[:len(head) + 4]
    if head_only or status == 101:
        return Response(status, headers, b"")
    n = int(headers.get("content-length", "0"))
    while len(buf) < n:
        _fill(sock, buf, deadline)
    body = bytes(buf[:n])
    del buf[:n]
    return Response(status, headers, body)


def _fill(sock: socket.socket, buf: bytearray, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no (complete) answer in time")
    sock.settimeout(left)
    chunk = sock.recv(65536)
    if not chunk:
        raise Closed("connection closed by the server")
    buf += chunk


def raw_http(host: str, port: int, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> Response:
    """Sends raw bytes on a new connection and reads one response."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        return read_http_response(s, bytearray(), timeout)


def http(relay: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> Response:
    h = {"Host": f"{relay.host}:{relay.port}", "Connection": "close"}
    if body or method in ("POST", "PUT"):
        h["Content-Length"] = str(len(body))
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return raw_http(relay.host, relay.port, req.encode("latin-1") + body, timeout)


def signed_path(relay: Any, method: str, path: str, body: bytes = b"",
                params: dict[str, str] | None = None, timestamp: int | None = None,
                key: str | None = None, secret: str | None = None) -> str:
    q = sign_api_request(key or relay.key, secret or relay.secret, method, path, body, params, timestamp)
    return path + "?" + "&".join(f"{k}={v}" for k, v in q.items())


def api(relay: Any, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
        **kw: Any) -> Response:
    """A signed Pusher HTTP API request; path is like /apps/{id}/events."""
    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return http(relay, method, signed_path(relay, method, path, raw, params, **kw), raw)


def up(relay: Any) -> bool:
    try:
        r = http(relay, "GET", "/up", timeout=2)
    except OSError:
        return False
    return r.status == 200 and r.body == b"OK"


# ---------------------------------------------------------------- WebSocket client


class WS:
    def __init__(self, host: str, port: int, path: str, headers: dict[str, str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.timeout = timeout
        self.close_frame: Frame | None = None
        key = base64.b64encode(os.urandom(16)).decode()
        h = {
            "Host": f"{host}:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
        }
        h.update(headers or {})
        req = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        self.sock.sendall(req.encode("latin-1"))
        self.response = read_http_response(self.sock, self.buf, timeout)
        if self.response.status == 101:
            expect = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
            assert self.response.headers.get("sec-websocket-accept") == expect
        self.socket_id: str | None = None
        self.established: dict | None = None

    # ---- sending

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, payload: bytes | str, opcode: int = OP_TEXT, **kw: Any) -> None:
        self.sock.sendall(build_frame(payload, opcode, **kw))

    def send_json(self, event: str | dict, data: Any = None, channel: str | None = None) -> None:
        if isinstance(event, dict):
            msg = event
        else:
            msg = {"event": event}
            if data is not None:
                msg["data"] = data
            if channel is not None:
                msg["channel"] = channel
        self.send_frame(json.dumps(msg))

    # ---- receiving

    def recv_frame(self, timeout: float | None = None) -> Frame:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            got = parse_frame(self.buf)
            if got is not None:
                frame, used = got
                del self.buf[:used]
                if frame.opcode == OP_CLOSE:
                    self.close_frame = frame
                return frame
            _fill(self.sock, self.buf, deadline)

    def recv(self, timeout: float | None = None, skip_pings: bool = True) -> dict:
        """The next Pusher message (data decoded into `data` when it is a JSON string).
        Raises AssertionError on a close frame, so unexpected closes are loud."""
        while True:
            f = self.recv_frame(timeout)
            if f.opcode == OP_CLOSE:
                raise AssertionError(f"closed {f.close_code} {f.close_reason!r} while waiting")
            if f.opcode != OP_TEXT:
                continue
            msg = json.loads(f.payload)
            msg["raw_data"] = msg.get("data")
            if isinstance(msg.get("data"), str):
                try:
                    msg["data"] = json.loads(msg["data"])
                except ValueError:
                    pass
            if skip_pings and msg.get("event") == "pusher:ping":
                continue
            return msg

    def expect(self, event: str, channel: str | None = None, timeout: float | None = None) -> dict:
        """The next message, which must be `event` (on `channel`)."""
        msg = self.recv(timeout)
        assert msg.get("event") == event, f"expected {event}, got {msg}"
        if channel is not None:
            assert msg.get("channel") == channel, f"expected channel {channel}, got {msg}"
        return msg

    def nothing(self, timeout: float = 0.3) -> None:
        """Asserts no Pusher message arrives within timeout."""
        try:
            msg = self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {msg}")

    def expect_close(self, timeout: float | None = None) -> Frame:
        """Reads (skipping messages) until the close frame; returns it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            f = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if f.opcode == OP_CLOSE:
                return f

    def expect_error_close(self, code: int, timeout: float | None = None) -> tuple[dict, Frame]:
        """pusher:error {code} and then a close frame with the same code (a refusal)."""
        msg = self.expect("pusher:error", timeout=timeout)
        assert msg["data"]["code"] == code, msg
        f = self.expect_close(timeout)
        assert f.close_code == code, (f.close_code, f.close_reason)
        return msg, f

    def is_eof(self, timeout: float = 2.0) -> bool:
        """True when the server closes the TCP connection (after any remaining frames)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                _fill(self.sock, self.buf, deadline)
        except Closed:
            return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    # ---- Pusher helpers

    def subscribe(self, channel: str, auth: str | None = None, channel_data: str | None = None,
                  expect: bool = True) -> dict | None:
        data: dict[str, Any] = {"channel": channel}
        if auth is not None:
            data["auth"] = auth
        if channel_data is not None:
            data["channel_data"] = channel_data
        self.send_json("pusher:subscribe", data)
        if expect:
            return self.expect("pusher_internal:subscription_succeeded", channel)
        return None

    def close(self, code: int = 1000) -> None:
        try:
            self.send_frame(struct.pack("!H", code), OP_CLOSE)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> WS:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()


def ws_path(key: str, query: str = "protocol=7&client=js&version=8.4.0") -> str:
    return f"/app/{key}" + (f"?{query}" if query is not None else "")


def open_ws(relay: Any, key: str | None = None, query: str | None = "protocol=7&client=js&version=8.4.0",
            headers: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> WS:
    """An upgraded WebSocket that has not read anything yet."""
    ws = WS(relay.host, relay.port, ws_path(key or relay.key, query), headers, timeout)
    assert ws.response.status == 101, ws.response
    return ws


def connect(relay: Any, **kw: Any) -> WS:
    """A WebSocket that has read pusher:connection_established."""
    ws = open_ws(relay, **kw)
    msg = ws.expect("pusher:connection_established")
    ws.established = msg["data"]
    ws.socket_id = msg["data"]["socket_id"]
    return ws


# ---------------------------------------------------------------- Pusher auth, intake signing


def join_presence(relay: Any, ws: WS, channel: str, user_id: Any, info: Any = None,
                  expect: bool = True) -> dict | None:
    """Subscribes ws to a presence channel as user_id (with user_info when info is not None)."""
    member = {"user_id": user_id}
    if info is not None:
        member["user_info"] = info
    cd = json.dumps(member)
    auth = sign_channel(relay.key, relay.secret, ws.socket_id, channel, cd)
    return ws.subscribe(channel, auth, cd, expect=expect)


def user_auth(relay: Any, ws: WS, user_data: str) -> str:
    """The pusher:signin `auth` ("key:sig") for user_data exactly as given (which need not be
    valid: the tests send user data without an id on purpose)."""
    sig = hmac_sha256_hex(relay.secret.encode(), f"{ws.socket_id}::user::{user_data}".encode())
    return f"{relay.key}:{sig}"


def signin(relay: Any, ws: WS, user: dict) -> dict:
    """Signs ws in as user; returns pusher:signin_success."""
    user_data = json.dumps(user)
    ws.send_json("pusher:signin", {"auth": user_auth(relay, ws, user_data), "user_data": user_data})
    return ws.expect("pusher:signin_success")


def intake_headers(secret: str, raw: bytes, ts: int | None = None) -> dict[str, str]:
    """Headers of a signed POST /api/events, built here with hmac (independent of the server)."""
    t = str(int(time.time()) if ts is None else ts)
    sig = hmac.new(secret.encode(), t.encode() + b"." + raw, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Fastrelay-Timestamp": t,
            "X-Fastrelay-Signature": "sha256=" + sig}
