"""The durable outbox: webhook events waiting for delivery, one entry per (event, endpoint).

Redis (when redis_url is set): a stream `{prefix}:webhooks:outbox` read through the consumer
group `senders`, so any node delivers and a crashed node's entries are taken over
(XAUTOCLAIM after `reclaim_idle`). The edge claim (SET NX) and the XADD run in one Lua script,
so an edge is either claimed *and* queued, or neither. Delivered entries are XACK'd and
XDEL'd; entries past the retry window move to `{prefix}:webhooks:dead`.

SQLite (no Redis): `data_dir/webhooks.sqlite3`, one table, written from one thread. Rows with
state 0 are pending, 1 dead-lettered, 2 redelivery requested by the CLI (the running server
picks those up within a second).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("fastrelay.webhooks")
T = TypeVar("T")


@dataclass(slots=True)
class Item:
    """One event for one endpoint."""

    id: str
    app_id: str
    url: str
    event: bytes  # the event's JSON object
    created: float  # first queued (s); the retry window runs from here


@dataclass(slots=True)
class Edge:
    """An edge ready for the outbox: its claim key (None: no claim needed) and entries."""

    claim: str | None
    neighbours: tuple[str, ...]
    app_id: str
    entries: list[tuple[str, bytes]]  # (url, event json)
    # occupied/vacated with cluster state: (this node's cluster id, channel): not queued when
    # another live node has subscribers on the channel
    cluster: tuple[str, str] | None = None


Deliver = Callable[[list[Item]], None]


class Outbox:
    async def start(self, deliver: Deliver) -> None: ...
    async def add(self, edges: list[Edge], oldest: float = 0.0) -> int:
        """Queues the edges' entries; returns how many edges were queued. `oldest`: the
        oldest heartbeat of a live node, for the edges' cluster checks."""
    async def done(self, items: list[Item]) -> None: ...
    async def dead(self, items: list[Item], error: str) -> None: ...
    async def keep(self, items: list[Item]) -> None: ...
    async def failed(self, limit: int = 1000) -> list[dict[str, Any]]: ...
    async def redeliver(self, ids: list[str] | None) -> int: ...
    async def close(self) -> None: ...


# ---------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    url TEXT NOT NULL,
    event BLOB NOT NULL,
    created REAL NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,  -- 0 pending, 1 dead, 2 redeliver requested
    failed_at REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_outbox_state ON webhook_outbox (state, id);
"""


class SqliteOutbox(Outbox):
    def __init__(self, path: Path, poll_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._x: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._deliver: Deliver | None = None
        self._poll: asyncio.Task[None] | None = None

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._x is None:
            self._x = ThreadPoolExecutor(1, thread_name_prefix="webhooks-sqlite")
            await asyncio.get_running_loop().run_in_executor(self._x, self._open)
        return await asyncio.get_running_loop().run_in_executor(self._x, fn, *args)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(_SCHEMA)
        self._db = db

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(db) in one write transaction: committed, or rolled back when anything raises
        (in autocommit mode a failed statement would otherwise leave it open, and every later
        BEGIN would fail)."""
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return out

    def _rows(self, state: int, limit: int = -1) -> list[Item]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, app_id, url, event, created FROM webhook_outbox WHERE state = ? "
            "ORDER BY id LIMIT ?", (state, limit)).fetchall()
        return [Item(str(r[0]), r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        leftover = await self._run(self._rows, 0)
        if leftover:
            log.warning("webhooks: %d pending from before the restart", len(leftover))
            deliver(leftover)
        self._poll = asyncio.create_task(self._poll_requeued(), name="webhooks-requeued")

    async def _poll_requeued(self) -> None:
        def requeue(db: sqlite3.Connection) -> list[Item]:
            now = time.time()  # the retry window starts again
            items = self._rows(2)
            db.execute("UPDATE webhook_outbox SET state = 0, created = ? WHERE state = 2", (now,))
            for it in items:
                it.created = now
            return items

        def take() -> list[Item]:
            assert self._db is not None
            if self._db.execute("SELECT 1 FROM webhook_outbox WHERE state = 2 LIMIT 1").fetchone() is None:
                return []
            return self._tx(requeue)

        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                items = await self._run(take)
            except Exception:
                log.exception("webhooks: outbox poll failed")
                continue
            if items and self._deliver is not None:
                self._deliver(items)

    async def add(self, edges: list[Edge], oldest: float = 0.0) -> int:
        now = time.time()
        flat = [(e.app_id, url, ev) for e in edges for url, ev in e.entries]
        if not flat:
            return 0

        def insert(db: sqlite3.Connection) -> list[Item]:
            first = None
            for app_id, url, ev in flat:
                cur = db.execute("INSERT INTO webhook_outbox (app_id, url, event, created) "
                                 "VALUES (?, ?, ?, ?)", (app_id, url, ev, now))
                if first is None:
                    first = cur.lastrowid
            assert first is not None
            return [Item(str(first + i), a, u, e, now) for i, (a, u, e) in enumerate(flat)]

        items = await self._run(self._tx, insert)
        if self._deliver is not None:
            self._deliver(items)
        return len(items)

    async def done(self, items: list[Item]) -> None:
        ids = [(int(it.id),) for it in items]

        def delete(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM webhook_outbox WHERE id = ?", ids)

        await self._run(self._tx, delete)

    async def dead(self, items: list[Item], error: str) -> None:
        now = time.time()
        rows = [(now, error, int(it.id)) for it in items]

        def mark(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE webhook_outbox SET state = 1, failed_at = ?, error = ? "
                           "WHERE id = ?", rows)

        await self._run(self._tx, mark)

    async def keep(self, items: list[Item]) -> None:
        return None

    async def failed(self, limit: int = 1000) -> list[dict[str, Any]]:
        def select() -> list[dict[str, Any]]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT id, app_id, url, event, created, failed_at, error FROM webhook_outbox "
                "WHERE state = 1 ORDER BY id LIMIT ?", (limit,)).fetchall()
            return [{"id": str(r[0]), "app_id": r[1], "url": r[2], "event": bytes(r[3]).decode(),
                     "created": r[4], "failed_at": r[5], "error": r[6]} for r in rows]

        return await self._run(select)

    async def redeliver(self, ids: list[str] | None) -> int:
        def update() -> int:
            assert self._db is not None
            if ids is None:
                return self._db.execute("UPDATE webhook_outbox SET state = 2 WHERE state = 1").rowcount
            n = 0
            for i in ids:
                n += self._db.execute("UPDATE webhook_outbox SET state = 2 WHERE state = 1 AND id = ?",
                                      (int(i),)).rowcount
            return n

        return await self._run(update)

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        if self._x is not None:
            if self._db is not None:
                await asyncio.get_running_loop().run_in_executor(self._x, self._db.close)
            self._x.shutdown(wait=True)
            self._x = None


# ---------------------------------------------------------------- Redis

# Many edges per call. KEYS[1] stream, KEYS[2] the cluster's node zset (cluster.py); then per
# edge 4 keys: its claim ('' for none), the neighbouring buckets' claims, the app's
# subscription-count hash ('' without a cluster check). ARGV[1] claim ttl ms, ARGV[2] oldest
# live heartbeat; then per edge:
# app id, this node's cluster id ('' for no cluster check), channel, n entries, n x (url, event).
# Per edge: 1 queued, 0 claimed by another node, 2 not a cluster edge (another live node has
# subscribers: this node's occupied/vacated is local only).
_CLAIM_AND_QUEUE = """
local out = {}
local nodes = nil
local a = 3
local k = 3
while a <= #ARGV do
  local app, me, channel, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local r = 1
  if me ~= '' then
    if nodes == nil then nodes = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], '+inf') end
    for _, node in ipairs(nodes) do
      if node ~= me then
        local c = redis.call('HGET', KEYS[k + 3], node .. '|' .. channel)
        if c and tonumber(c) > 0 then r = 2 break end
      end
    end
  end
  if r == 1 and KEYS[k] ~= '' then
    if redis.call('EXISTS', KEYS[k + 1]) == 1 or redis.call('EXISTS', KEYS[k + 2]) == 1 then
      r = 0
    elseif not redis.call('SET', KEYS[k], '1', 'NX', 'PX', ARGV[1]) then
      r = 0
    end
  end
  if r == 1 then
    for i = a + 4, a + 3 + 2 * n, 2 do
      redis.call('XADD', KEYS[1], '*', 'app', app, 'url', ARGV[i], 'ev', ARGV[i + 1])
    end
  end
  out[#out + 1] = r
  a = a + 4 + 2 * n
  k = k + 4
end
return out
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _item(entry_id: Any, fields: dict) -> Item:
    eid = _s(entry_id)
    f = {_s(k): v for k, v in fields.items()}
    return Item(eid, _s(f.get("app", b"")), _s(f.get("url", b"")), bytes(f.get("ev", b"{}")),
                int(eid.split("-")[0]) / 1000.0)


class RedisOutbox(Outbox):
    def __init__(self, redis: Any, prefix: str, consumer: str, claim_ttl_ms: int = 60_000,
                 reclaim_idle: float = 30.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.stream = f"{prefix}:webhooks:outbox"
        self.dead_stream = f"{prefix}:webhooks:dead"
        self.group = "senders"
        self.consumer = consumer
        self.claim_ttl_ms = claim_ttl_ms
        self.reclaim_idle = reclaim_idle
        self._script = redis.register_script(_CLAIM_AND_QUEUE)
        self._task: asyncio.Task[None] | None = None
        self._deliver: Deliver | None = None

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as e:  # BUSYGROUP: exists
            if "BUSYGROUP" not in str(e):
                raise

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        await self._ensure_group()
        self._task = asyncio.create_task(self._read(), name="webhooks-redis-reader")

    async def _read(self) -> None:
        assert self._deliver is not None
        cursor = "0"  # first our own unacknowledged entries (a restart), then new ones (">")
        last_reclaim = 0.0
        while True:
            try:
                now = time.monotonic()
                if now - last_reclaim >= max(0.5, self.reclaim_idle / 2):
                    last_reclaim = now
                    start = "0-0"
                    while True:
                        res = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                          int(self.reclaim_idle * 1000), start,
                                                          count=500)
                        start, entries = _s(res[0]), res[1]
                        items = [_item(i, f) for i, f in entries if f]
                        if items:
                            log.warning("webhooks: took over %d entries from a silent node",
                                        len(items))
                            self._deliver(items)
                        if start == "0-0":
                            break
                res = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: cursor},
                                                  count=1000, block=None if cursor != ">" else 200)
                entries = res[0][1] if res else []
                items = [_item(i, f) for i, f in entries if f]
                if cursor != ">":
                    cursor = _s(entries[-1][0]) if entries else ">"
                    if items:
                        log.warning("webhooks: %d pending from before the restart", len(items))
                if items:
                    self._deliver(items)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if "NOGROUP" in str(e):
                    try:
                        await self._ensure_group()
                    except Exception:
                        pass
                log.warning("webhooks: outbox read failed (%r)", e)
                await asyncio.sleep(1.0)

    async def add(self, edges: list[Edge], oldest: float = 0.0) -> int:
        queued = 0
        for i in range(0, len(edges), 200):  # one script call per 200 edges
            keys = [self.stream, f"{self.prefix}:nodes"]
            args: list[Any] = [self.claim_ttl_ms, oldest]
            for e in edges[i:i + 200]:
                n1, n2 = e.neighbours or ("", "")
                node_id, channel = e.cluster or ("", "")
                keys += [e.claim or "", n1, n2, f"{self.prefix}:subs:{e.app_id}" if e.cluster else ""]
                args += [e.app_id, node_id, channel, len(e.entries)]
                for url, ev in e.entries:
                    args += [url, ev]
            queued += sum(1 for r in await self._script(keys=keys, args=args) if int(r) == 1)
        return queued

    async def done(self, items: list[Item]) -> None:
        ids = [it.id for it in items]
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        await pipe.execute()

    async def dead(self, items: list[Item], error: str) -> None:
        now = str(time.time())
        pipe = self.redis.pipeline(transaction=True)
        for it in items:
            pipe.xadd(self.dead_stream, {"app": it.app_id, "url": it.url, "ev": it.event,
                                         "created": str(it.created), "failed_at": now,
                                         "error": error, "orig": it.id})
        ids = [it.id for it in items]
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        await pipe.execute()

    async def keep(self, items: list[Item]) -> None:
        """Resets the idle time of entries this node still retries, so nobody takes them."""
        if items:
            await self.redis.xclaim(self.stream, self.group, self.consumer, 0,
                                    [it.id for it in items], justid=True)

    async def failed(self, limit: int = 1000) -> list[dict[str, Any]]:
        out = []
        for eid, f in await self.redis.xrange(self.dead_stream, count=limit):
            f = {_s(k): _s(v) for k, v in f.items()}
            out.append({"id": _s(eid), "app_id": f.get("app"), "url": f.get("url"),
                        "event": f.get("ev"), "created": float(f.get("created", 0)),
                        "failed_at": float(f.get("failed_at", 0)), "error": f.get("error")})
        return out

    async def redeliver(self, ids: list[str] | None) -> int:
        if ids is None:
            entries = await self.redis.xrange(self.dead_stream)
        else:
            entries = []
            for i in ids:
                entries += await self.redis.xrange(self.dead_stream, i, i)
        n = 0
        for eid, f in entries:
            f = {_s(k): v for k, v in f.items()}
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(self.stream, {"app": f["app"], "url": f["url"], "ev": f["ev"]})
            pipe.xdel(self.dead_stream, eid)
            await pipe.execute()
            n += 1
        return n

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
