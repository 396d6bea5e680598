"""Cluster-wide state in Redis: presence rosters, subscription and connection counts, node
heartbeats, and the clean-up of a dead node's entries. Used when redis_url is set; with one
process and no Redis, the node's own tables are the cluster.

Keys (under the deployment's prefix P; node ids are hex, so '|' separates them from the rest):
  P:nodes                      zset  node id -> last heartbeat (unix seconds)
  P:node:{id}:presence         set   "app\\0channel" of the presence hashes the node is in
  P:presence:{app}:{channel}   hash  "{node}|{user_id}" -> user_info JSON
  P:subs:{app}                 hash  "{node}|{channel}" -> local subscriber count
  P:conns:{app}                hash  "{node}" -> local connection count
  P:reap:{id}                  string, claimed (SET NX) by the one survivor that cleans up
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from . import _core
from .protocol import message

if TYPE_CHECKING:
    from .bus.redis import RedisBus
    from .node import Node

log = logging.getLogger("fastrelay.cluster")

FLUSH = 0.1  # counts are written at most this often

# Adds node|user; says whether the user is new to the cluster, or refuses a full channel.
_JOIN = """
local field = ARGV[1] .. '|' .. ARGV[2]
local all = redis.call('HGETALL', KEYS[1])
local users, seen = 0, {}
local present = false
for i = 1, #all, 2 do
  local f = all[i]
  local uid = string.sub(f, string.find(f, '|', 1, true) + 1)
  if not seen[uid] then seen[uid] = true; users = users + 1 end
  if uid == ARGV[2] then present = true end
end
if not present and users >= tonumber(ARGV[5]) then return {-1, all} end
redis.call('HSET', KEYS[1], field, ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
if present then return {0, all} end
return {1, all}
"""

# Removes node|user; says whether the user has left the whole cluster.
_LEAVE = """
redis.call('HDEL', KEYS[1], ARGV[1] .. '|' .. ARGV[2])
local mine = false
local keys = redis.call('HKEYS', KEYS[1])
for _, f in ipairs(keys) do
  local sep = string.find(f, '|', 1, true)
  if string.sub(f, sep + 1) == ARGV[2] then return 0 end
  if string.sub(f, 1, sep - 1) == ARGV[1] then mine = true end
end
if not mine then redis.call('SREM', KEYS[2], ARGV[3]) end
return 1
"""

# Removes every field of a dead node from a presence hash; returns the users now gone.
_REAP_PRESENCE = """
local prefix = ARGV[1] .. '|'
local keys = redis.call('HKEYS', KEYS[1])
local removed, remaining = {}, {}
for _, f in ipairs(keys) do
  local sep = string.find(f, '|', 1, true)
  local uid = string.sub(f, sep + 1)
  if string.sub(f, 1, sep) == prefix then
    redis.call('HDEL', KEYS[1], f)
    removed[uid] = true
  else
    remaining[uid] = true
  end
end
local gone = {}
for uid, _ in pairs(removed) do
  if not remaining[uid] then table.insert(gone, uid) end
end
return gone
"""

# Removes every "{node}|..." field of a hash.
_REAP_HASH = """
local prefix = ARGV[1] .. '|'
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, #prefix) == prefix then redis.call('HDEL', KEYS[1], f) end
end
return 1
"""


def _split(field: bytes | str) -> tuple[str, str]:
    f = field.decode() if isinstance(field, bytes) else field
    node, _, rest = f.partition("|")
    return node, rest


class Cluster:
    def __init__(self, node: Node, redis: Any, bus: RedisBus, prefix: str) -> None:
        self.node = node
        self.redis = redis
        self.bus = bus
        self.p = prefix
        self.id = bus.node_id
        self._join = redis.register_script(_JOIN)
        self._leave = redis.register_script(_LEAVE)
        self._reap_presence = redis.register_script(_REAP_PRESENCE)
        self._reap_hash = redis.register_script(_REAP_HASH)
        self._dirty_subs: set[tuple[str, str]] = set()
        self._dirty_conns: set[str] = set()
        self._flush_scheduled = False
        self.conn_totals: dict[str, int] = {}  # app -> cluster connections (refreshed on flush)
        # per local presence channel, the members this node's subscribers have been told of:
        # member events race the roster snapshot a joiner got, so they are applied once
        self.views: dict[tuple[str, str], set[str]] = {}
        self.alive = 1
        # a node silent for node_timeout is reaped; heartbeats come four times as often, so
        # a dead node's entries are gone within 1.25 x node_timeout (25 s by default)
        self.dead_after = node.cfg.node_timeout
        self.heartbeat = node.cfg.node_timeout / 4
        self._tasks: list[asyncio.Task] = []
        bus.on("pm", self._on_presence_message)
        bus.on("term", self._on_terminate)
        bus.on_reconnect.append(self.resync)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeat()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        try:  # leave cleanly: our entries go now instead of after the dead-node timeout
            await asyncio.wait_for(self._reap(self.id), 3)
        except Exception:
            pass

    def _key(self, app_id: str, channel: str) -> str:
        return f"{self.p}:presence:{app_id}:{channel}"

    # ------------------------------------------------------------------ presence

    async def join(self, app_id: str, channel: str, user_id: str, info: Any,
                   socket_id: str) -> tuple[int, dict[str, Any]]:
        """Adds this node's membership of a user: (1 new to the cluster | 0 already there |
        -1 channel full, the roster). A new member is announced to every node."""
        app = self.node.apps.by_id(app_id)
        limit = app.max_presence_members if app is not None else 100
        status, fields = await self._join(
            keys=[self._key(app_id, channel), f"{self.p}:node:{self.id}:presence"],
            args=[self.id, user_id, orjson.dumps(info), f"{app_id}\0{channel}", limit])
        if status == 1:
            self.bus.send("pm", [app_id, channel, 1, user_id, info, socket_id])
            self._member_frame(app_id, channel, 1, user_id, info, _core.find_socket(socket_id))
            self.node.on_member_added(self._channel(app_id, channel), user_id)
        return status, self._parse(fields)

    def leave(self, app_id: str, channel: str, user_id: str) -> None:
        """Called when the last local connection of a user leaves a presence channel."""
        self.node.loop.create_task(self._leave_task(app_id, channel, user_id))

    async def _leave_task(self, app_id: str, channel: str, user_id: str) -> None:
        try:
            gone = await self._leave(keys=[self._key(app_id, channel), f"{self.p}:node:{self.id}:presence"],
                                     args=[self.id, user_id, f"{app_id}\0{channel}"])
        except Exception as e:
            log.warning("presence leave failed", extra={"error": str(e)[:200]})
            return
        if gone:
            self._removed(app_id, channel, user_id)

    def _removed(self, app_id: str, channel: str, user_id: str) -> None:
        self.bus.send("pm", [app_id, channel, 0, user_id, None, None])
        self._member_frame(app_id, channel, 0, user_id, None, None)
        self.node.on_member_removed(self._channel(app_id, channel), user_id)

    def _channel(self, app_id: str, channel: str) -> _core.Channel:
        """The local channel, or a stand-in naming it (the edge hooks take a channel)."""
        ch = self.node.channels.get(app_id, channel)
        return ch if ch is not None else _core.Channel(app_id, channel, 0)

    def _on_presence_message(self, body: list) -> None:
        app_id, channel, added, user_id, info, socket_id = body
        exclude = _core.find_socket(socket_id) if socket_id else None
        self._member_frame(app_id, channel, added, user_id, info, exclude)

    def _member_frame(self, app_id: str, channel: str, added: int, user_id: str, info: Any,
                      exclude: _core.Conn | None) -> None:
        ch = self.node.channels.get(app_id, channel)
        if ch is None:
            return
        view = self.views.setdefault((app_id, channel), set())
        if added:
            if user_id in view:
                return
            view.add(user_id)
        else:
            if user_id not in view:
                return
            view.discard(user_id)
        if added:
            ch.fanout(message("pusher_internal:member_added",
                              {"user_id": user_id, "user_info": info}, channel), exclude)
        else:
            ch.fanout(message("pusher_internal:member_removed", {"user_id": user_id}, channel))

    @staticmethod
    def _parse(fields: list) -> dict[str, Any]:
        roster: dict[str, Any] = {}
        for i in range(0, len(fields), 2):
            _, uid = _split(fields[i])
            roster[uid] = orjson.loads(fields[i + 1])
        return roster

    async def roster(self, app_id: str, channel: str) -> dict[str, Any]:
        raw = await self.redis.hgetall(self._key(app_id, channel))
        roster: dict[str, Any] = {}
        for f, v in raw.items():
            roster[_split(f)[1]] = orjson.loads(v)
        return roster

    # ------------------------------------------------------------------ counts

    def joined(self, app_id: str, channel: str, members: dict[str, Any]) -> None:
        """A local subscriber was given this roster: later member events are relative to it."""
        self.views.setdefault((app_id, channel), set()).update(members)

    def subs_changed(self, app_id: str, channel: str) -> None:
        if self.node.channels.get(app_id, channel) is None:
            self.views.pop((app_id, channel), None)
        self._dirty_subs.add((app_id, channel))
        self._schedule()

    def conns_changed(self, app_id: str) -> None:
        self._dirty_conns.add(app_id)
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.node.loop.call_later(FLUSH, lambda: self.node.loop.create_task(self._flush()))

    async def _flush(self) -> None:
        self._flush_scheduled = False
        subs, self._dirty_subs = self._dirty_subs, set()
        conns, self._dirty_conns = self._dirty_conns, set()
        try:
            pipe = self.redis.pipeline(transaction=False)
            for app_id, channel in subs:
                ch = self.node.channels.get(app_id, channel)
                field = f"{self.id}|{channel}"
                if ch is None or not ch.members:
                    pipe.hdel(f"{self.p}:subs:{app_id}", field)
                else:
                    pipe.hset(f"{self.p}:subs:{app_id}", field, len(ch.members))
            for app_id in conns:
                pipe.hset(f"{self.p}:conns:{app_id}", self.id, self.node.app_connections(app_id))
                pipe.hvals(f"{self.p}:conns:{app_id}")
            results = await pipe.execute()
        except Exception as e:
            log.warning("cluster count flush failed", extra={"error": str(e)[:200]})
            self._dirty_subs |= subs
            self._dirty_conns |= conns
            return
        i = len(subs)
        for app_id in conns:
            self.conn_totals[app_id] = sum(int(v) for v in results[i + 1])
            i += 2

    def app_connections(self, app_id: str) -> int:
        """Cluster-wide (as of the last flush), never below what this node holds."""
        return max(self.conn_totals.get(app_id, 0), self.node.app_connections(app_id))

    async def channel_counts(self, app_id: str) -> dict[str, int]:
        raw = await self.redis.hgetall(f"{self.p}:subs:{app_id}")
        out: dict[str, int] = {}
        for f, v in raw.items():
            _, channel = _split(f)
            out[channel] = out.get(channel, 0) + int(v)
        return {k: v for k, v in out.items() if v > 0}

    # ------------------------------------------------------------------ terminate

    def terminate_user(self, app_id: str, user_id: str) -> None:
        self.bus.send("term", [app_id, user_id])

    def _on_terminate(self, body: list) -> None:
        self.node.terminate_local(body[0], body[1])

    # ------------------------------------------------------------------ heartbeats and reaping

    async def _heartbeat(self) -> None:
        while True:
            try:
                now = time.time()
                await self.redis.zadd(f"{self.p}:nodes", {self.id: now})
                dead = await self.redis.zrangebyscore(f"{self.p}:nodes", "-inf", now - self.dead_after)
                self.alive = max(1, await self.redis.zcount(f"{self.p}:nodes", now - self.dead_after, "+inf"))
                for d in dead:
                    d = d.decode() if isinstance(d, bytes) else d
                    if d != self.id and await self.redis.set(f"{self.p}:reap:{d}", self.id, nx=True, ex=60):
                        await self._reap(d)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("heartbeat failed", extra={"error": str(e)[:200]})
            await asyncio.sleep(self.heartbeat)

    async def _reap(self, dead: str) -> None:
        """Removes a node's entries; sends one member_removed per user who really left."""
        members = await self.redis.smembers(f"{self.p}:node:{dead}:presence")
        for m in members:
            app_id, _, channel = (m.decode() if isinstance(m, bytes) else m).partition("\0")
            gone = await self._reap_presence(keys=[self._key(app_id, channel)], args=[dead])
            for uid in gone:
                self._removed(app_id, channel, uid.decode() if isinstance(uid, bytes) else uid)
        for app in self.node.apps.all():
            subs = await self.redis.hgetall(f"{self.p}:subs:{app.id}")
            theirs, others = set(), set()
            for f, v in subs.items():
                if int(v) > 0:
                    owner, channel = _split(f)
                    if owner == dead:
                        theirs.add(channel)
                    else:
                        others.add(channel)
            await self._reap_hash(keys=[f"{self.p}:subs:{app.id}"], args=[dead])
            await self.redis.hdel(f"{self.p}:conns:{app.id}", dead)
            # the dead node cannot say its channels emptied: the reaper does, once
            for channel in theirs - others:
                if self.node.channels.get(app.id, channel) is None:
                    self.node.on_vacated(self._channel(app.id, channel))
        await self.redis.delete(f"{self.p}:node:{dead}:presence")
        await self.redis.zrem(f"{self.p}:nodes", dead)
        if dead != self.id:
            log.info("reaped a dead node", extra={"node": dead, "presence_channels": len(members)})

    async def resync(self) -> None:
        """After Redis came back (maybe empty): write this node's state again."""
        try:
            await self.redis.zadd(f"{self.p}:nodes", {self.id: time.time()})
            pipe = self.redis.pipeline(transaction=False)
            for ch in list(self.node.channels.entries.values()):
                self._dirty_subs.add((ch.app_id, ch.name))
                if ch.roster:
                    for uid, (_, info) in ch.roster.items():
                        pipe.hset(self._key(ch.app_id, ch.name), f"{self.id}|{uid}", orjson.dumps(info))
                    pipe.sadd(f"{self.p}:node:{self.id}:presence", f"{ch.app_id}\0{ch.name}")
            await pipe.execute()
            for app in self.node.apps.all():
                self._dirty_conns.add(app.id)
            self._schedule()
        except Exception as e:
            log.warning("cluster resync failed", extra={"error": str(e)[:200]})
