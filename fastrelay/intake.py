"""Intake: `POST /api/events` (our own API), reading the audit back (`GET /api/events`) and
replay, plus the rate-limit gate the Pusher HTTP API shares with it.

Stage 1 of the pipeline: resolve the app, check the signature, validate every field,
rate-limit, then hand the event to the node (audit, then bus) and answer 202 at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from . import channels as kinds
from ._core import (
    MAX_EVENT_NAME,
    Conn,
    Request,
    event_data,
    json_body,
    parse_query,
    unquote,
    valid_socket_id,
    verify_hmac,
)
from ._core import admit as _core_admit
from ._core import gate as _core_gate
from .apps import App
from .audit.base import MAX_QUERY_LIMIT
from .errors import HttpError
from .events import Event
from .http_api import answer_later, reply
from .idempotency import IdempotencyStore, RedisIdempotencyStore
from .ratelimit import RateLimiter
from .signatures import ascii_int, check_api_request

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("fastrelay.intake")

TIMESTAMP_WINDOW = 300  # seconds, for X-Fastrelay-Timestamp
MAX_IDEMPOTENCY_KEY = 200
READ_SETTLE_TIMEOUT = 1.0  # seconds a read of the audit waits for this worker's queue


class Intake:
    def __init__(self, node: Node, secret: bytes, redis: Any = None) -> None:
        self.node = node
        self.limiter = RateLimiter()
        self.idem_local = IdempotencyStore(secret)
        self.idem_redis = (RedisIdempotencyStore(redis, secret, prefix=node.cfg.key_prefix)
                           if redis is not None else None)
        self.observers = Observers(redis, f"{node.cfg.key_prefix}:events") if redis is not None else None
        self.rate_limited = 0

    # ------------------------------------------------------------------ shared gate

    # gate(app, cost): the per-app rate limit, HttpError 429. Compiled: every API event
    # passes it; an app with a limit goes on to limit().
    gate = _core_gate

    def limit(self, app: App, cost: int) -> None:
        """The rate limit of an app that has one; raises 429 with the headers clients back
        off by."""
        # cluster-wide: each of the live nodes takes its share of the app's rate
        share = self.node.cluster.alive if self.node.cluster is not None else 1
        rate = app.rate_limit / share
        burst = max(1, (app.rate_burst or int(app.rate_limit)) // share)
        d = self.limiter.check(app.id, rate, burst, cost)
        if not d.allowed:
            self.rate_limited += 1
            headers = list(d.headers().items())
            raise HttpError(429, f"rate limit of {app.rate_limit:g} events per second exceeded",
                            headers)

    # admit(events, replay_of=None): Node.accept, or HttpError 503 when the audit cannot
    # take them; then the observers. Compiled: the last step of every API, for every event.
    admit = _core_admit

    def accepted(self, events: list[Event]) -> None:
        """Tells observers about accepted events (the console's own publish comes here too)."""
        if self.observers is not None:
            for ev in events:
                self.observers.publish(ev)

    # ------------------------------------------------------------------ routing

    def handle(self, conn: Conn, req: Request) -> None:
        path = req.path.rstrip("/")
        if path == "/api/events":
            if req.method == "POST":
                return self.post_event(conn, req)
            if req.method == "GET":
                return self.spawn(conn, req, self.list_events(conn, req))
            raise HttpError(405, f"{req.method} is not allowed here")
        parts = path.split("/")  # ["", "api", "events", id, "replay"]
        if len(parts) == 5 and parts[2] == "events" and parts[4] == "replay":
            if req.method != "POST":
                raise HttpError(405, f"{req.method} is not allowed here")
            return self.spawn(conn, req, self.replay(conn, req, unquote(parts[3])))
        raise HttpError(404, f"no route for {req.path[:100]}")

    def spawn(self, conn: Conn, req: Request, coro: Any) -> None:
        answer_later(self.node, conn, req, coro)

    # ------------------------------------------------------------------ authentication

    def authenticate(self, req: Request, body_app_key: Any = None) -> App:
        h = req.headers
        params = parse_query(req.query) if req.query else {}
        key = h.get("x-fastrelay-key") or body_app_key or params.get("app_key") or params.get("auth_key")
        if not isinstance(key, str) or not key:
            raise HttpError(401, "app_key is required (in the body or the X-Fastrelay-Key header)")
        app = self.node.apps.by_key(key)
        if app is None:
            raise HttpError(404, "unknown app")
        signature = h.get("x-fastrelay-signature")
        if signature is not None:
            ts = h.get("x-fastrelay-timestamp", "")
            seconds = ascii_int(ts)
            if seconds is None:
                raise HttpError(401, "X-Fastrelay-Timestamp (Unix seconds) is required")
            if abs(time.time() - seconds) > TIMESTAMP_WINDOW:
                raise HttpError(401, f"X-Fastrelay-Timestamp is more than {TIMESTAMP_WINDOW} s off")
            scheme, _, hexsig = signature.partition("=")
            if scheme != "sha256" or not verify_hmac(app.secret_bytes, ts.encode() + b"." + req.body,
                                                     hexsig):
                raise HttpError(401, "invalid signature")
        elif "auth_signature" in params:
            problem = check_api_request(app.key, app.secret_bytes, req.method, req.path,
                                        req.query, req.body)
            if problem is not None:
                raise HttpError(401, problem)
        else:
            raise HttpError(401, "the request must be signed (X-Fastrelay-Signature or auth_signature)")
        if not app.enabled:
            raise HttpError(403, "app is disabled")
        return app

    # ------------------------------------------------------------------ POST /api/events

    def post_event(self, conn: Conn, req: Request) -> None:
        body = json_body(req.body)
        app = self.authenticate(req, body.get("app_key"))
        if self.node.draining:
            raise HttpError(503, "draining", [("Retry-After", "1")])
        event, idem_key = self.validate(app, body)
        self.gate(app, 1)
        answer = orjson.dumps({"id": event.id, "accepted_at": event.accepted_at})
        if idem_key is not None and self.idem_redis is not None:
            return self.spawn(conn, req, self._accept_idempotent_redis(conn, req, app, event,
                                                                       idem_key, answer))
        earlier = self.idem_local.claim(app.id, idem_key, answer) if idem_key is not None else None
        try:
            self._answer(conn, req, event, answer, earlier)
        except HttpError:
            if idem_key is not None:
                self.idem_local.release(app.id, idem_key)
            raise

    async def _accept_idempotent_redis(self, conn: Conn, req: Request, app: App, event: Event,
                                       idem_key: str, answer: bytes) -> None:
        earlier = await self.idem_redis.claim(app.id, idem_key, answer)
        try:
            self._answer(conn, req, event, answer, earlier)
        except HttpError:
            await self.idem_redis.release(app.id, idem_key)
            raise

    def _answer(self, conn: Conn, req: Request, event: Event, answer: bytes,
                earlier: bytes | None) -> None:
        """A repeated idempotency key gets the first answer again; otherwise the event is
        admitted (HttpError when refused: the caller releases the key) and answered 202."""
        if earlier is not None:
            conn.respond(202, earlier, b"application/json", [("Idempotent-Replayed", "true")],
                         req.keep_alive)
            return
        self.admit([event])
        conn.respond(202, answer, b"application/json", None, req.keep_alive)

    def validate(self, app: App, body: dict) -> tuple[Event, str | None]:
        """Every field checked; all problems reported at once (422 with one message per field)."""
        errors: dict[str, str] = {}
        chans = body.get("channels")
        if chans is None and "channel" in body:
            chans = [body.get("channel")]
        if chans is None:
            errors["channels"] = "channel or channels is required"
        elif not isinstance(chans, list) or not chans:
            errors["channels"] = "must be a non-empty list of channel names"
        elif len(chans) > app.max_channels_per_event:
            errors["channels"] = f"at most {app.max_channels_per_event} channels"
        else:
            for ch in chans:
                problem = kinds.name_error(ch)
                if problem is not None:
                    errors["channels"] = f"{problem}: {str(ch)[:100]!r}"
                    break
            if "channels" not in errors and len(chans) > 1 and any(
                    kinds.kind_of(c) & kinds.ENCRYPTED for c in chans):
                errors["channels"] = "an encrypted channel must be the only channel"
        name = body.get("event")
        if not isinstance(name, str) or not name:
            errors["event"] = "is required and must be a string"
        elif len(name) > MAX_EVENT_NAME:
            errors["event"] = f"must be at most {MAX_EVENT_NAME} characters"
        elif name.startswith("pusher:") or name.startswith("pusher_internal:"):
            errors["event"] = "the pusher: prefixes are reserved"
        if "data" not in body:
            errors["data"] = "is required (any JSON value)"
            data = None
        else:
            data = event_data(app.max_event_payload, body["data"])
        socket_id = body.get("socket_id")
        if socket_id is not None and not valid_socket_id(socket_id):
            errors["socket_id"] = "must look like 123.456"
        idem = body.get("idempotency_key")
        if idem is not None and (not isinstance(idem, str) or not idem or len(idem) > MAX_IDEMPOTENCY_KEY):
            errors["idempotency_key"] = f"must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters"
        unknown = set(body) - {"app_key", "channel", "channels", "event", "data", "socket_id",
                               "idempotency_key"}
        for k in sorted(unknown)[:10]:
            errors[str(k)[:50]] = "unknown field"
        if errors:
            raise HttpError(422, "validation failed", body={"fields": errors})
        return Event(app_id=app.id, channels=chans, name=name, data=data, socket_id=socket_id,
                     source="intake"), idem

    # ------------------------------------------------------------------ reading back and replay

    async def list_events(self, conn: Conn, req: Request) -> None:
        app = self.authenticate(req)
        audit = self._audit()
        q = parse_query(req.query)
        try:
            limit = min(int(q.get("limit", "100")), MAX_QUERY_LIMIT)
            since = float(q["since"]) if q.get("since") else None
            until = float(q["until"]) if q.get("until") else None
        except ValueError:
            raise HttpError(400, "limit, since and until must be numbers") from None
        if limit < 1:
            raise HttpError(400, "limit must be at least 1")
        await self._settle(audit)
        rows = await audit.query(app.id, channel=q.get("channel") or None, event=q.get("event") or None,
                                 since=since, until=until, limit=limit, before=q.get("before") or None)
        out: dict[str, Any] = {"events": rows}
        if len(rows) == limit:
            out["next"] = rows[-1]["id"]  # pass as ?before= for the next (older) page
        reply(conn, req, 200, out)

    async def replay(self, conn: Conn, req: Request, event_id: str) -> None:
        app = self.authenticate(req)
        audit = self._audit()
        await self._settle(audit)
        row = await audit.get(app.id, event_id)
        if row is None:
            raise HttpError(404, "no such event in the audit log")
        self.gate(app, 1)
        event = Event(app_id=app.id, channels=list(row["channels"]), name=row["name"], data=row["data"],
                      socket_id=None, source="replay")
        self.admit([event], replay_of=event_id)
        reply(conn, req, 202, {"id": event.id, "replay_of": event_id, "accepted_at": event.accepted_at})

    def _audit(self) -> Any:
        if self.node.audit is None:
            raise HttpError(404, "the audit log is off on this server")
        return self.node.audit

    @staticmethod
    async def _settle(audit: Any) -> None:
        """Before a read: what this worker accepted so far is written (read your writes; the
        writer batches for audit_flush_interval). Other workers' rows land within it."""
        try:
            await asyncio.wait_for(audit.flush(), READ_SETTLE_TIMEOUT)
        except (TimeoutError, RuntimeError):
            pass  # the database is slow or away (rows wait in the spill file): read what is there


class Observers:
    """Publishes each accepted event's metadata (not its payload) on a Redis channel, in
    pipelined batches from a background task so intake never waits for Redis."""

    def __init__(self, redis: Any, channel: str, max_pending: int = 100_000) -> None:
        self.redis = redis
        self.channel = channel
        self.pending: deque[bytes] = deque(maxlen=max_pending)  # drops oldest when Redis is away
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.dropped = 0

    def publish(self, ev: Event) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append(orjson.dumps({
            "id": ev.id, "app_id": ev.app_id, "channels": ev.channels, "event": ev.name,
            "size": len(ev.data) if isinstance(ev.data, str) else len(orjson.dumps(ev.data)),
            "source": ev.source, "accepted_at": ev.accepted_at,
        }))
        self.wake.set()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                batch = [self.pending.popleft() for _ in range(min(len(self.pending), 500))]
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    for item in batch:
                        pipe.publish(self.channel, item)
                    await pipe.execute()
                except Exception:
                    self.dropped += len(batch)  # observers are best effort; the audit is the record
                    await asyncio.sleep(1)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
