"""The Pusher Channels protocol (v7) on an open WebSocket: connect, subscribe, presence,
client events, sign-in and watchlists. Framing is the compiled core's; this is the logic."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from . import channels as kinds
from ._core import Channel, Conn, encode_frame
from .apps import App
from .events import Event
from .signatures import ascii_int, check_channel_auth, check_user_auth

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("fastrelay.protocol")

SUPPORTED_PROTOCOLS = range(4, 8)
MAX_USER_ID = 128
MAX_WATCHLIST = 100


def message(event: str, data: Any = None, channel: str | None = None) -> bytes:
    """A server message frame; `data` is sent JSON-encoded as a string, the reference form."""
    msg: dict[str, Any] = {"event": event}
    if channel is not None:
        msg["channel"] = channel
    msg["data"] = data if isinstance(data, str) else orjson.dumps({} if data is None else data).decode()
    return encode_frame(orjson.dumps(msg))


def error(code: int | None, text: str) -> bytes:
    return message("pusher:error", {"code": code, "message": text})


PONG = message("pusher:pong")


class PusherProtocol:
    """What each Pusher message does to the node's state. One instance per worker."""

    def __init__(self, node: Node) -> None:
        self.node = node

    # ------------------------------------------------------------------ connect

    def open(self, conn: Conn, app: App | None, params: dict[str, str], origin: str | None) -> None:
        """Called right after the 101: check the app and version, then say hello."""
        if app is None:
            return self.refuse(conn, 4001, "App key not in this cluster: no such app")
        if not app.enabled:
            return self.refuse(conn, 4003, "App is disabled")
        version = params.get("protocol")
        if version is None:
            return self.refuse(conn, 4008, "No protocol version supplied")
        number = ascii_int(version)
        if number is None:
            return self.refuse(conn, 4006, "Invalid version string format")
        if number not in SUPPORTED_PROTOCOLS:
            return self.refuse(conn, 4007, f"Unsupported protocol version {version}")
        if not app.origin_allowed(origin):
            return self.refuse(conn, 4009, "Origin not allowed")
        node = self.node
        if app.max_connections and node.cluster_app_connections(app.id) >= app.max_connections:
            return self.refuse(conn, 4004, "App is over its connection quota")
        if node.cfg.max_connections and node.websocket_count() > node.cfg.max_connections:
            return self.refuse(conn, 4100, "Over capacity")
        conn.app = app
        node.register(conn)
        conn.send(message("pusher:connection_established", {
            "socket_id": conn.socket_id,
            "activity_timeout": int(node.cfg.activity_timeout),
        }))
        if app.user_authentication:
            node.loop.call_later(app.user_auth_timeout, self._signin_deadline, conn)

    def refuse(self, conn: Conn, code: int, text: str) -> None:
        self.node.stats.closed_with(code)
        conn.send(error(code, text))
        conn.close(code, text)
        log.info("connection refused", extra={"code": code, "reason": text})

    def _signin_deadline(self, conn: Conn) -> None:
        if conn.is_websocket and conn.user_id is None:
            self.refuse(conn, 4009, "Connection not authorized within timeout")

    # ------------------------------------------------------------------ messages

    def on_message(self, conn: Conn, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                conn.close(1007, "invalid UTF-8 in a text frame")
                return
            conn.send(error(None, "Invalid JSON"))
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            conn.send(error(None, "A message must be a JSON object with an 'event' string"))
            return
        event: str = msg["event"]
        data = msg.get("data")
        if event.startswith("pusher:") and isinstance(data, str):
            # some clients double-encode the data of protocol messages
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
        if event == "pusher:ping":
            conn.send(PONG)
        elif event == "pusher:pong":
            pass  # activity was noted by the core
        elif event == "pusher:subscribe":
            self.subscribe(conn, data if isinstance(data, dict) else {})
        elif event == "pusher:unsubscribe":
            if isinstance(data, dict):
                self.unsubscribe(conn, data.get("channel"))
        elif event == "pusher:signin":
            self.signin(conn, data if isinstance(data, dict) else {})
        elif event.startswith("client-"):
            self.client_event(conn, event, msg.get("channel"), data)
        else:
            conn.send(error(None, f"Unsupported event: {event[:64]}"))

    # ------------------------------------------------------------------ subscriptions

    def subscription_error(self, conn: Conn, channel: str, kind: str, text: str, status: int) -> None:
        conn.send(message("pusher:subscription_error",
                          {"type": kind, "error": text, "status": status}, channel))

    def subscribe(self, conn: Conn, data: dict) -> None:
        name = data.get("channel")
        problem = kinds.name_error(name)
        if problem is not None:
            if isinstance(name, str) and name:
                self.subscription_error(conn, name[:200], "InvalidChannel", problem, 400)
            else:
                conn.send(error(None, problem))
            return
        app: App = conn.app
        node = self.node
        ch = self._find(conn, name)
        if ch is not None:  # already subscribed: confirm again, change nothing
            conn.send(self._succeeded(ch, name))
            return
        if len(conn.channels or ()) >= node.cfg.max_channels_per_connection:
            self.subscription_error(conn, name, "LimitReached",
                                    "Too many channels on this connection", 4100)
            return
        kind = kinds.kind_of(name)
        user_id = None
        user_info = None
        if kind & kinds.USER:
            if conn.user_id is None or name != kinds.USER_PREFIX + conn.user_id:
                self.subscription_error(conn, name, "AuthError",
                                        "Only the signed-in user may subscribe", 403)
                return
        elif kind & kinds.PRIVATE:
            channel_data = data.get("channel_data") if kind & kinds.PRESENCE else None
            if kind & kinds.PRESENCE and not isinstance(channel_data, str):
                self.subscription_error(conn, name, "AuthError",
                                        "channel_data is required on presence channels", 401)
                return
            if not check_channel_auth(app.key, app.secret_bytes, data.get("auth"),
                                      conn.socket_id, name, channel_data):
                self.subscription_error(conn, name, "AuthError",
                                        f"Invalid signature for {name}", 401)
                return
            if kind & kinds.PRESENCE:
                parsed = self._presence_member(conn, name, channel_data, app)
                if parsed is None:
                    return
                user_id, user_info = parsed
                if node.cluster is not None:
                    node.loop.create_task(self._cluster_presence(conn, name, user_id, user_info))
                    return
        ch, created = node.channels.get_or_create(app.id, name)
        if kind & kinds.PRESENCE:
            if user_id not in ch.roster and len(ch.roster) >= app.max_presence_members:
                node.channels.remove_if_empty(ch)
                self.subscription_error(conn, name, "LimitReached",
                                        "The presence channel is full", 4100)
                return
            if self._roster_add(ch, user_id, user_info):
                ch.fanout(message("pusher_internal:member_added",
                                  {"user_id": user_id, "user_info": user_info}, name), conn)
                node.on_member_added(ch, user_id)
        self._join(conn, ch, user_id)
        conn.send(self._succeeded(ch, name))
        self._subscribed(conn, ch, created)

    @staticmethod
    def _find(conn: Conn, name: object) -> Channel | None:
        """The channel of that name this connection is subscribed to."""
        for ch in conn.channels or ():
            if ch.name == name:
                return ch
        return None

    @staticmethod
    def _roster_add(ch: Channel, user_id: str, info: Any) -> bool:
        """One more connection of user_id on ch (the latest user_info wins); True when the
        user is new on this worker."""
        entry = ch.roster.get(user_id)
        if entry is None:
            ch.roster[user_id] = [1, info]
            return True
        entry[0] += 1
        entry[1] = info
        return False

    @staticmethod
    def _join(conn: Conn, ch: Channel, user_id: str | None) -> None:
        ch.members[conn] = user_id
        if conn.channels is None:
            conn.channels = [ch]
        else:
            conn.channels.append(ch)

    def _subscribed(self, conn: Conn, ch: Channel, created: bool) -> None:
        """What follows a confirmed subscription: the cache, and the channel's edges."""
        node = self.node
        app: App = conn.app
        name = ch.name
        if ch.kind & kinds.CACHE:
            cached = node.cached(app.id, name)
            if cached is not None:
                conn.send(cached)
            else:
                conn.send(message("pusher:cache_miss", None, name))
                node.on_cache_miss(app, name)
        if created:
            node.on_occupied(ch)
        node.on_subscription_change(ch)

    def _succeeded(self, ch: Channel, name: str) -> bytes:
        if ch.roster is None:
            return message("pusher_internal:subscription_succeeded", None, name)
        return self._presence_succeeded(name, {uid: e[1] for uid, e in ch.roster.items()})

    @staticmethod
    def _presence_succeeded(name: str, members: dict[str, Any]) -> bytes:
        return message("pusher_internal:subscription_succeeded", {"presence": {
            "ids": list(members), "hash": members, "count": len(members),
        }}, name)

    async def _cluster_presence(self, conn: Conn, name: str, user_id: str, info: Any) -> None:
        """Presence across nodes: Redis holds the roster; member events go over the bus."""
        node = self.node
        cluster = node.cluster
        app: App = conn.app
        here = node.channels.get(app.id, name)
        if here is not None and user_id in here.roster:  # this node already holds the user
            status, members = 0, await cluster.roster(app.id, name)
        else:
            status, members = await cluster.join(app.id, name, user_id, info, conn.socket_id)
        if status < 0:
            self.subscription_error(conn, name, "LimitReached", "The presence channel is full", 4100)
            return
        ch, created = node.channels.get_or_create(app.id, name)
        if not conn.is_websocket or conn in ch.members:  # gone (or doubled) while we waited
            if user_id not in ch.roster:
                cluster.leave(app.id, name, user_id)
            node.channels.remove_if_empty(ch)
            return
        self._roster_add(ch, user_id, info)
        self._join(conn, ch, user_id)
        members[user_id] = info
        cluster.joined(app.id, name, members)
        conn.send(self._presence_succeeded(name, members))
        self._subscribed(conn, ch, created)

    def _presence_member(self, conn: Conn, name: str, channel_data: str,
                         app: App) -> tuple[str, Any] | None:
        try:
            member = orjson.loads(channel_data)
        except orjson.JSONDecodeError:
            member = None
        uid = member.get("user_id") if isinstance(member, dict) else None
        if isinstance(uid, bool) or not isinstance(uid, str | int) or uid == "":
            self.subscription_error(conn, name, "InvalidChannelData",
                                    "channel_data must be a JSON object with a user_id", 400)
            return None
        uid = str(uid)
        if len(uid) > MAX_USER_ID:
            self.subscription_error(conn, name, "InvalidChannelData",
                                    f"user_id is longer than {MAX_USER_ID} characters", 400)
            return None
        info = member.get("user_info")
        if info is not None and len(orjson.dumps(info)) > app.max_presence_user_info:
            self.subscription_error(conn, name, "InvalidChannelData",
                                    f"user_info is larger than {app.max_presence_user_info} bytes", 400)
            return None
        return uid, info

    def unsubscribe(self, conn: Conn, name: object) -> None:
        ch = self._find(conn, name) if isinstance(name, str) else None
        if ch is not None:
            conn.channels.remove(ch)
            self._leave(conn, ch)

    def _leave(self, conn: Conn, ch: Channel) -> None:
        user_id = ch.members.pop(conn, None)
        node = self.node
        if ch.roster is not None and user_id is not None:
            entry = ch.roster.get(user_id)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del ch.roster[user_id]
                    if node.cluster is not None:
                        node.cluster.leave(ch.app_id, ch.name, user_id)
                    else:
                        ch.fanout(message("pusher_internal:member_removed",
                                          {"user_id": user_id}, ch.name))
                        node.on_member_removed(ch, user_id)
        if node.channels.remove_if_empty(ch):
            node.on_vacated(ch)
        else:
            node.on_subscription_change(ch)

    def on_close(self, conn: Conn) -> None:
        if conn.app is None:
            return  # refused before registration
        if conn.channels:
            chans, conn.channels = conn.channels, None
            for ch in chans:
                self._leave(conn, ch)
        self.node.unregister(conn)

    # ------------------------------------------------------------------ client events

    def client_event(self, conn: Conn, event: str, name: object, data: Any) -> None:
        app: App = conn.app
        if not app.client_events:
            conn.send(error(None, "Client events are not enabled for this app"))
            return
        if len(event) > 200:
            conn.send(error(None, "Event name is longer than 200 characters"))
            return
        ch = self._find(conn, name)
        if ch is None:
            conn.send(error(None, "Client event rejected: not subscribed to that channel"))
            return
        kind = ch.kind
        if not kind & kinds.PRIVATE or kind & kinds.ENCRYPTED:
            conn.send(error(None, "Client event rejected: only private and presence channels "
                                  "(not encrypted ones) accept client events"))
            return
        now = int(time.monotonic())
        if conn.ev_window != now:
            conn.ev_window = now
            conn.ev_count = 0
        conn.ev_count += 1
        if conn.ev_count > app.client_event_rate:
            conn.send(error(4301, f"Client event rate limit exceeded: at most "
                                  f"{app.client_event_rate} per second"))
            return
        if len(orjson.dumps(data)) > app.max_event_payload:
            conn.send(error(None, f"Client event data is larger than {app.max_event_payload} bytes"))
            return
        user_id = ch.members.get(conn) if kind & kinds.PRESENCE else None
        self.node.publish_client(Event(
            app_id=app.id, channels=[ch.name], name=event, data=data,
            socket_id=conn.socket_id, source="client", user_id=user_id,
        ))

    # ------------------------------------------------------------------ users

    def signin(self, conn: Conn, data: dict) -> None:
        app: App = conn.app
        user_data = data.get("user_data")
        if not isinstance(user_data, str) or not check_user_auth(
                app.key, app.secret_bytes, data.get("auth"), conn.socket_id, user_data):
            self.refuse(conn, 4009, "Invalid user authentication signature")
            return
        try:
            user = orjson.loads(user_data)
        except orjson.JSONDecodeError:
            user = None
        uid = user.get("id") if isinstance(user, dict) else None
        if isinstance(uid, int) and not isinstance(uid, bool):
            uid = str(uid)
        if not isinstance(uid, str) or not uid or len(uid) > MAX_USER_ID:
            self.refuse(conn, 4009, "user_data must be a JSON object with a string id")
            return
        watchlist = user.get("watchlist") or []
        if not isinstance(watchlist, list):
            watchlist = []
        if len(watchlist) > MAX_WATCHLIST:
            conn.send(error(4302, f"A watchlist may hold at most {MAX_WATCHLIST} user ids"))
            watchlist = watchlist[:MAX_WATCHLIST]
        if conn.user_id is not None:
            self.node.sign_out(conn)
        conn.user_id = uid
        conn.send(message("pusher:signin_success", {"user_data": user_data}))
        self.node.sign_in(conn, [str(w) for w in watchlist])
