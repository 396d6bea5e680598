"""The live console at /console: per app, connections, channels and presence members, a live
stream of events and a form to send a test event. Plain HTML and JS (index.html beside this
file), no build step.

Access: `admin_token` must be set (otherwise /console is 404). Open `/console?token=...` once;
the answer sets an HttpOnly, SameSite=Strict cookie holding an HMAC of the token (not the
token), and the page drops the token from the address bar. API calls may also send the token
in an `X-Fastrelay-Admin-Token` header.

The live stream is an ordinary Pusher WebSocket: the page connects to `/app/{key}` for each
app and subscribes to `private-fastrelay-console`, authorised by `/console/api/auth` (which
signs with the app's secret server-side, so the secret never reaches the browser). The
metrics hooks forward each fanned-out event of that app to that channel, and only while it is
occupied: with no console open, the cost is one falsy check per event.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._core import (
    Conn,
    Request,
    api_event,
    constant_time_equal,
    hmac_sha256_hex,
    json_body,
    parse_query,
)
from ..errors import HttpError
from ..http_api import reply
from ..metrics import CONSOLE_CHANNEL
from ..signatures import sign_channel

if TYPE_CHECKING:
    from ..metrics import Ops
    from ..node import Node

PAGE = Path(__file__).with_name("index.html")
COOKIE = "fastrelay_console"
MAX_CHANNELS = 200
MAX_MEMBERS = 100


class Console:
    def __init__(self, node: Node, ops: Ops) -> None:
        self.node = node
        self.ops = ops
        self._page: bytes | None = None

    # ------------------------------------------------------------------ access

    def _cookie_value(self) -> str:
        return hmac_sha256_hex(self.node.cfg.admin_token.encode(), b"fastrelay-console")

    def _query_token_ok(self, req: Request) -> bool:
        token = parse_query(req.query).get("token", "") if req.query else ""
        return bool(token) and constant_time_equal(token.encode(), self.node.cfg.admin_token.encode())

    def _authorised(self, req: Request) -> bool:
        token = self.node.cfg.admin_token
        header = req.headers.get("x-fastrelay-admin-token")
        if header is not None:
            return constant_time_equal(header.encode(), token.encode())
        if self._query_token_ok(req):
            return True
        want = self._cookie_value()
        for part in req.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and constant_time_equal(value.encode(), want.encode()):
                return True
        return False

    # ------------------------------------------------------------------ routing

    def handle(self, conn: Conn, req: Request) -> None:
        if not self.node.cfg.admin_token:
            raise HttpError(404, "the console is off: set admin_token to enable it")
        path = req.path.rstrip("/") or "/"
        if path == "/console":
            if req.method != "GET":
                raise HttpError(405, f"{req.method} is not allowed here")
            if not self._authorised(req):
                conn.respond(401, LOGIN, b"text/html; charset=utf-8", None, req.keep_alive)
                return
            headers = [("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"),
                       ("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                        "style-src 'unsafe-inline'; connect-src 'self' ws: wss:")]
            if self._query_token_ok(req):
                headers.append(("Set-Cookie", f"{COOKIE}={self._cookie_value()}; Path=/console; "
                                              "HttpOnly; SameSite=Strict"))
            conn.respond(200, self.page(), b"text/html; charset=utf-8", headers, req.keep_alive)
            return
        if not self._authorised(req):
            raise HttpError(401, "admin token required")
        routes = {("GET", "/console/api/state"): self.state,
                  ("POST", "/console/api/auth"): self.auth,
                  ("POST", "/console/api/send"): self.send}
        handler = routes.get((req.method, path))
        if handler is None:
            raise HttpError(404, f"no route for {req.method} {path[:100]}")
        handler(conn, req)

    def page(self) -> bytes:
        if self._page is None:
            self._page = PAGE.read_bytes()
        return self._page

    def _app(self, app_id: Any) -> Any:
        app = self.node.apps.by_id(str(app_id)) if app_id is not None else None
        if app is None:
            raise HttpError(404, "unknown app")
        return app

    # ------------------------------------------------------------------ API

    def state(self, conn: Conn, req: Request) -> None:
        node = self.node
        s = node.stats
        apps = []
        for app in node.apps.all():
            console = self.ops.console.get(app.id)
            chans = []
            for ch in sorted(node.channels.of_app(app.id), key=lambda c: c.name):
                if ch.name == CONSOLE_CHANNEL:
                    continue
                entry: dict[str, Any] = {"name": ch.name, "subscribers": len(ch.members)}
                if ch.roster is not None:
                    entry["members"] = [{"id": uid, "info": v[1] if isinstance(v, list | tuple) else None}
                                        for uid, v in list(ch.roster.items())[:MAX_MEMBERS]]
                chans.append(entry)
            apps.append({
                "id": app.id, "key": app.key, "name": app.name, "enabled": app.enabled,
                "connections": node.app_connections(app.id) - (len(console.members) if console else 0),
                "channel_count": len(chans), "channels": chans[:MAX_CHANNELS],
            })
        reply(conn, req, 200, {
            "worker": self.ops.worker, "draining": node.draining,
            "websockets": node.websocket_count(), "published": s.published,
            "deliveries": s.deliveries, "client_events": s.client_events, "apps": apps,
        }, [("Cache-Control", "no-store")])

    def auth(self, conn: Conn, req: Request) -> None:
        body = json_body(req.body)
        app = self._app(body.get("app_id"))
        socket_id = body.get("socket_id")
        if not isinstance(socket_id, str) or not socket_id:
            raise HttpError(400, "socket_id is required")
        reply(conn, req, 200, {"auth": sign_channel(app.key, app.secret, socket_id, CONSOLE_CHANNEL),
                               "channel": CONSOLE_CHANNEL})

    def send(self, conn: Conn, req: Request) -> None:
        body = json_body(req.body)
        app = self._app(body.get("app_id"))
        data = body.get("data", "")
        item = {"name": body.get("event"), "channel": body.get("channel"), "data": data}
        event, _ = api_event(app, item, False)
        event.source = "console"
        if self.node.draining:
            raise HttpError(503, "draining")
        self.node.intake.admit([event])
        reply(conn, req, 200, {"id": event.id, "accepted_at": event.accepted_at})


LOGIN = b"""<!doctype html><meta charset="utf-8"><title>fastrelay console</title>
<style>body{font:15px system-ui,sans-serif;margin:4em auto;max-width:28em;color:#222}
input{font:inherit;padding:.4em;width:100%;box-sizing:border-box;margin:.5em 0}</style>
<h1>fastrelay console</h1><p>An admin token is required (the <code>admin_token</code> setting).</p>
<form method="get" action="/console"><input type="password" name="token" placeholder="admin token"
autofocus><button>Open</button></form>
"""
