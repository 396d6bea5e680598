"""The Python floor: the least a Pusher-protocol broadcast server can do on picows + uvloop.

No auth, no limits, no presence: connection_established, pusher:subscribe (any channel),
pusher:ping, and POST /apps/{id}/events fan-out. Each event is encoded into one WebSocket
frame once; frames published to a channel within one loop iteration are joined and written
with a single transport.write per subscriber (flushed via loop.call_soon), which is the
per-socket batching a real server can do under load.

picows only accepts GET upgrades, so the HTTP trigger endpoint listens on a second port:

    python -m bench.floor --port 7001 --http-port 7002
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from collections.abc import Callable

import orjson
import picows
import uvloop

from bench.common import raise_nofile

Writer = Callable[[bytes], None]

CONNECTED = (
    b'{"event":"pusher:connection_established",'
    b'"data":"{\\"socket_id\\":\\"1.1\\",\\"activity_timeout\\":120}"}'
)
PONG = b'{"event":"pusher:pong","data":"{}"}'


def ws_frame(payload: bytes) -> bytes:
    """Unmasked server-to-client text frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Hub:
    def __init__(self) -> None:
        # channel -> {transport: raw write}; writing pre-encoded frames to the underlying
        # transport skips picows' per-send header build and copy.
        self.channels: dict[str, dict[picows.WSTransport, Writer]] = {}
        self.pending: dict[str, list[bytes]] = {}
        self.scheduled = False
        self.loop = asyncio.get_event_loop()

    def publish(self, channel: str, payload: bytes) -> None:
        if channel not in self.channels:
            return
        frame = ws_frame(payload)
        lst = self.pending.get(channel)
        if lst is None:
            self.pending[channel] = [frame]
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self.flush)
        else:
            lst.append(frame)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        channels = self.channels
        for ch, frames in pending.items():
            subs = channels.get(ch)
            if not subs:
                continue
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            for w in list(subs.values()):
                w(data)


class FloorListener(picows.WSListener):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.subscribed: list[str] = []

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.write = transport.underlying_transport.write
        transport.send(picows.WSMsgType.TEXT, CONNECTED)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != picows.WSMsgType.TEXT:
            return
        try:
            msg = orjson.loads(frame.get_payload_as_bytes())
            ev = msg.get("event")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if ev == "pusher:subscribe":
            data = msg.get("data") or {}
            ch = data.get("channel") if isinstance(data, dict) else None
            if not isinstance(ch, str):
                return
            self.hub.channels.setdefault(ch, {})[transport] = self.write
            self.subscribed.append(ch)
            reply = {"event": "pusher_internal:subscription_succeeded", "channel": ch, "data": "{}"}
            transport.send(picows.WSMsgType.TEXT, orjson.dumps(reply))
        elif ev == "pusher:ping":
            transport.send(picows.WSMsgType.TEXT, PONG)

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        for ch in self.subscribed:
            subs = self.hub.channels.get(ch)
            if subs is not None:
                subs.pop(transport, None)
                if not subs:
                    del self.hub.channels[ch]


class TriggerHTTP(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server for POST /apps/{id}/events (no auth check)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass; duck-type it.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        while True:
            he = buf.find(b"\r\n\r\n")
            if he < 0:
                return
            head = bytes(buf[:he])
            lower = head.lower()
            i = lower.find(b"\ncontent-length:")
            n = 0
            if i >= 0:
                j = lower.find(b"\r", i + 16)
                n = int(lower[i + 16 : j if j >= 0 else len(lower)])
            end = he + 4 + n
            if len(buf) < end:
                return
            body = bytes(buf[he + 4 : end])
            del buf[:end]
            self.handle(head, body)

    def reply(self, status: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def handle(self, head: bytes, body: bytes) -> None:
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        parts = line.split(b" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
        path = target.split(b"?", 1)[0]
        if method == b"POST" and path.startswith(b"/apps/") and path.endswith(b"/events"):
            try:
                ev = orjson.loads(body)
                name = ev["name"]
                data = ev["data"]
                chans = ev.get("channels") or ([ev["channel"]] if "channel" in ev else [])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self.reply(b"400 Bad Request", b'{"error":"bad body"}')
                return
            # Answer first, then fan out: the trigger latency excludes the fan-out.
            self.reply(b"200 OK", b"{}")
            for ch in chans:
                self.hub.publish(
                    ch, orjson.dumps({"event": name, "channel": ch, "data": data})
                )
        elif method == b"GET":
            self.reply(b"200 OK", b"OK")
        else:
            self.reply(b"404 Not Found", b"{}")


async def serve(host: str, port: int, http_port: int) -> None:
    raise_nofile()
    hub = Hub()

    def factory(req: picows.WSUpgradeRequest) -> picows.WSListener:
        return FloorListener(hub)

    ws = await picows.ws_create_server(
        factory, host, port, read_buffer_init_size=1024, websocket_handshake_timeout=10,
        backlog=4096,
    )
    loop = asyncio.get_running_loop()
    http = await loop.create_server(lambda: TriggerHTTP(hub), host, http_port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor: ws on {host}:{port}, http on {host}:{http_port}", flush=True)
    await stop.wait()
    ws.close()
    http.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7001)
    ap.add_argument("--http-port", type=int, default=7002)
    a = ap.parse_args()
    uvloop.run(serve(a.host, a.port, a.http_port))


if __name__ == "__main__":
    main()
