"""HTTP routes on the shared port: the WebSocket upgrade, health, and the Pusher HTTP API."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from . import channels as kinds
from ._core import Conn, Request, api_checks, api_event, json_body, parse_query, unquote
from .apps import App
from .errors import HttpError
from .events import Event

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("fastrelay.http")


def reply(conn: Conn, req: Request, status: int, body: Any,
          headers: list[tuple[str, str]] | None = None) -> None:
    conn.respond(status, orjson.dumps(body), b"application/json", headers, req.keep_alive)


def answer_later(node: Node, conn: Conn, req: Request, coro: Any) -> None:
    """Answers from a task (a query that awaits Redis or the database); the connection reads
    nothing more until then, so pipelined answers stay in order."""
    conn.hold()

    async def run() -> None:
        try:
            await coro
        except HttpError as e:
            reply(conn, req, e.status, e.payload(), e.headers)
        except Exception:
            log.exception("HTTP handler failed", extra={"path": req.path})
            reply(conn, req, 500, {"error": "internal error"})
        finally:
            node.http.answered_later(conn)

    node.loop.create_task(run())


class HttpApi:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.later: dict[Conn, str] = {}  # the route of each answer a task will send
        # (method, route) -> handler; the route is the path after /apps/{id}/ (POST events,
        # the hot one, never comes here: _core.on_request runs it)
        self.routes = {
            ("POST", "batch_events"): self.batch,
            ("GET", "channels"): self.channels,
            ("GET", "channel"): self.channel,
            ("GET", "users"): self.users,
            ("POST", "terminate_connections"): self.terminate,
        }

    def handle(self, conn: Conn, req: Request) -> None:
        """Every route but the hot one, POST /apps/{id}/events, which _core.on_request runs
        compiled before this."""
        path = req.path
        ops = self.node.ops
        route = "unknown"  # a bounded label for the metrics (never the raw path)
        try:
            if path.startswith("/app/"):
                route = "websocket"
                self.upgrade(conn, req)
            elif path.startswith("/apps/"):
                parts = path.split("/")
                name, arg = self._route(parts[3:])
                route = f"pusher:{name}"
                self.api(conn, req, parts, name, arg)
            elif path.startswith("/users/") and path.endswith("/terminate_connections"):
                # the Pusher Python SDK (3.3) leaves out /apps/{id}: find the app by auth_key
                route = "pusher:terminate_connections"
                app = self.node.apps.by_key(parse_query(req.query).get("auth_key", ""))
                if app is None:
                    raise HttpError(404, "unknown app")
                parts = ["", "apps", app.id] + path.split("/")[1:]
                name, arg = self._route(parts[3:])
                self.api(conn, req, parts, name, arg, app)
            elif path == "/up":
                route = "up"
                conn.respond(200, b"OK", b"text/plain", None, req.keep_alive)
            elif path == "/ready":
                route = "ready"
                if ops is None:
                    if self.node.draining:
                        raise HttpError(503, "draining")
                    reply(conn, req, 200, {"ready": True})
                else:
                    ops.serve_ready(conn, req)
            elif path == "/metrics" and ops is not None and not self.node.cfg.metrics_port:
                route = "metrics"
                ops.serve_metrics(conn, req)
            elif (path == "/console" or path.startswith("/console/")) and ops is not None:
                route = "console"
                ops.console_handler().handle(conn, req)
            elif path.startswith("/api/"):
                if path.rstrip("/").endswith("/replay"):
                    route = "intake:replay"
                else:
                    route = "intake:events"
                self.node.intake.handle(conn, req)
            else:
                raise HttpError(404, f"no route for {path[:100]}")
        except Exception as exc:
            self.finish(conn, req, route, exc)
        else:
            self.finish(conn, req, route)

    def finish(self, conn: Conn, req: Request, route: str, exc: Exception | None = None) -> None:
        """A request's end: the exception's answer (its HttpError, or 500 for a failure) and
        the metrics count, now or once the task that answers has (answered_later)."""
        if isinstance(exc, HttpError):
            reply(conn, req, exc.status, exc.payload(), exc.headers)
        elif exc is not None:
            log.error("HTTP handler failed", exc_info=exc, extra={"path": req.path})
            conn.respond(500, b'{"error":"internal error"}', keep_alive=False)
        ops = self.node.ops
        if ops is not None:
            if conn.held:
                self.later[conn] = route
            else:
                ops.count_http(route, conn.status)

    def answered_later(self, conn: Conn) -> None:
        route = self.later.pop(conn, None)
        if route is not None and self.node.ops is not None:
            self.node.ops.count_http(route, conn.status)

    # ------------------------------------------------------------------ WebSocket

    def upgrade(self, conn: Conn, req: Request) -> None:
        h = req.headers
        if req.method != "GET":
            raise HttpError(405, "WebSocket upgrades use GET")
        if "websocket" not in h.get("upgrade", "").lower():
            raise HttpError(426, "this endpoint speaks WebSocket; send an Upgrade request")
        if h.get("sec-websocket-version") != "13" or not h.get("sec-websocket-key"):
            raise HttpError(400, "Sec-WebSocket-Version 13 and Sec-WebSocket-Key are required")
        if self.node.draining:
            raise HttpError(503, "draining")
        key = unquote(req.path[5:].rstrip("/"))
        conn.accept_websocket(req)
        app = self.node.apps.by_key(key)
        self.node.protocol.open(conn, app, parse_query(req.query), h.get("origin"))

    # ------------------------------------------------------------------ the Pusher HTTP API

    def api(self, conn: Conn, req: Request, parts: list[str], route: str | None, arg: str | None,
            app: App | None = None) -> None:
        """The Pusher HTTP API. parts: the path split on "/" as ["", "apps", id, ...]."""
        app = app or self._app(parts[2])
        if route is None:
            raise HttpError(404, f"no route for {req.path[:100]}")
        handler = self.routes.get((req.method, route))
        if handler is None:
            raise HttpError(405, f"{req.method} is not allowed here")
        api_checks(app, req, self.node.draining)
        handler(conn, req, app, arg)

    def _app(self, app_id: str) -> App:
        app = self.node.apps.by_id(unquote(app_id))
        if app is None:
            raise HttpError(404, "unknown app")
        return app

    @staticmethod
    def _route(rest: list[str]) -> tuple[str | None, str | None]:
        if len(rest) == 1 and rest[0] in ("events", "batch_events", "channels"):
            return rest[0], None
        if len(rest) == 2 and rest[0] == "channels":
            return "channel", unquote(rest[1])
        if len(rest) == 3 and rest[0] == "channels" and rest[2] == "users":
            return "users", unquote(rest[1])
        if len(rest) == 3 and rest[0] == "users" and rest[2] == "terminate_connections":
            return "terminate_connections", unquote(rest[1])
        return None, None

    async def _info(self, app: App, channels: list[str], attrs: list[str],
                    counts: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
        """user_count / subscription_count per channel, cluster-wide; `counts`: the app's
        subscription counts when the caller already has them."""
        if counts is None:
            counts = await self.node.channel_counts(app.id) if "subscription_count" in attrs else {}
        out: dict[str, dict[str, int]] = {}
        for ch in channels:
            info: dict[str, int] = {}
            if "user_count" in attrs and kinds.kind_of(ch) & kinds.PRESENCE:
                info["user_count"] = len(await self.node.roster(app.id, ch))
            if "subscription_count" in attrs:
                info["subscription_count"] = counts.get(ch, 0)
            out[ch] = info
        return out

    def answer_counts(self, conn: Conn, req: Request, asked: tuple[App, Event, list[str]]) -> None:
        """POST /apps/{id}/events asked for channel counts (_core.trigger returned `asked`):
        the event is accepted, the answer comes from a task."""
        app, event, attrs = asked
        answer_later(self.node, conn, req, self._trigger_info(conn, req, app, event, attrs))
        self.finish(conn, req, "pusher:events")

    async def _trigger_info(self, conn: Conn, req: Request, app: App, event: Event,
                            attrs: list[str]) -> None:
        reply(conn, req, 200, {"channels": await self._info(app, event.channels, attrs)})

    def batch(self, conn: Conn, req: Request, app: App, arg: Any) -> None:
        items = json_body(req.body).get("batch")
        if not isinstance(items, list) or not items:
            raise HttpError(400, "batch must be a non-empty list")
        if len(items) > app.max_batch_size:
            raise HttpError(400, f"at most {app.max_batch_size} events per batch")
        parsed = []
        for item in items:
            if not isinstance(item, dict):
                raise HttpError(400, "each batch item must be an object")
            parsed.append(api_event(app, item, True))
        events = [ev for ev, _ in parsed]
        self.node.intake.gate(app, len(events))  # the same rate limit and admission as intake
        self.node.intake.admit(events)
        if any(attrs for _, attrs in parsed):
            answer_later(self.node, conn, req, self._batch_info(conn, req, app, parsed))
        else:
            conn.respond(200, b"{}", b"application/json", None, req.keep_alive)

    async def _batch_info(self, conn: Conn, req: Request, app: App,
                          parsed: list[tuple[Event, list[str]]]) -> None:
        counts = (await self.node.channel_counts(app.id)
                  if any("subscription_count" in attrs for _, attrs in parsed) else {})
        out = []
        for ev, attrs in parsed:
            out.append((await self._info(app, ev.channels, attrs, counts))[ev.channels[0]]
                       if attrs else {})
        reply(conn, req, 200, {"batch": out})

    def channels(self, conn: Conn, req: Request, app: App, arg: Any) -> None:
        params = parse_query(req.query)
        prefix = params.get("filter_by_prefix", "")
        attrs = [a for a in params.get("info", "").split(",") if a]
        for a in attrs:
            if a == "user_count" and not prefix.startswith("presence-"):
                raise HttpError(400, "info=user_count needs filter_by_prefix=presence-")
            if a not in ("user_count", "subscription_count"):
                raise HttpError(400, f"unknown info attribute {a[:40]!r}")
        answer_later(self.node, conn, req, self._channels(conn, req, app, prefix, attrs))

    async def _channels(self, conn: Conn, req: Request, app: App, prefix: str, attrs: list[str]) -> None:
        counts = await self.node.channel_counts(app.id, prefix)
        reply(conn, req, 200, {"channels": await self._info(app, list(counts), attrs, counts)})

    def channel(self, conn: Conn, req: Request, app: App, name: str) -> None:
        problem = kinds.name_error(name)
        if problem is not None:
            raise HttpError(400, problem)
        attrs = [a for a in parse_query(req.query).get("info", "").split(",") if a]
        for a in attrs:
            if a == "user_count" and not kinds.kind_of(name) & kinds.PRESENCE:
                raise HttpError(400, "user_count is only available on presence channels")
            if a not in ("user_count", "subscription_count", "cache"):
                raise HttpError(400, f"unknown info attribute {a[:40]!r}")
        answer_later(self.node, conn, req, self._channel(conn, req, app, name, attrs))

    async def _channel(self, conn: Conn, req: Request, app: App, name: str, attrs: list[str]) -> None:
        count = (await self.node.channel_counts(app.id, name)).get(name, 0)
        out: dict[str, Any] = {"occupied": count > 0}
        if "user_count" in attrs:
            out["user_count"] = len(await self.node.roster(app.id, name))
        if "subscription_count" in attrs:
            out["subscription_count"] = count
        if "cache" in attrs:
            cached = self.node.cached_event(app.id, name)
            if cached is not None:
                ev, ttl = cached
                out["cache"] = {"event": ev.name, "data": ev.data, "ttl": int(ttl)}
        reply(conn, req, 200, out)

    def users(self, conn: Conn, req: Request, app: App, name: str) -> None:
        if not kinds.kind_of(name) & kinds.PRESENCE:
            raise HttpError(400, "users are only listed for presence channels")
        answer_later(self.node, conn, req, self._users(conn, req, app, name))

    async def _users(self, conn: Conn, req: Request, app: App, name: str) -> None:
        reply(conn, req, 200, {"users": [{"id": uid} for uid in await self.node.roster(app.id, name)]})

    def terminate(self, conn: Conn, req: Request, app: App, user_id: str) -> None:
        self.node.terminate_user(app.id, user_id)
        reply(conn, req, 200, {})
