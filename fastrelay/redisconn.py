"""Redis connections from one URL, for a single server, a Sentinel-managed master or a Redis
Cluster:

  redis://[:password@]host:port[/db]            (rediss:// for TLS)
  redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]
  redis+cluster://[:password@]host:port[,host:port...]

On a Redis Cluster the bus uses sharded pub/sub (SPUBLISH/SSUBSCRIBE), and the cluster-state
keys share one hash tag so the Lua scripts that touch several of them stay in one slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from .config import Config


@dataclass
class RedisTarget:
    kind: str  # single | sentinel | cluster
    hosts: list[tuple[str, int]]
    password: str | None
    db: int
    service: str

    @property
    def sharded(self) -> bool:
        return self.kind == "cluster"


def parse(url: str) -> RedisTarget:
    u = urlparse(url)
    scheme = u.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("single", [], None, 0, "")
    if scheme not in ("redis+sentinel", "redis+cluster"):
        raise ValueError(f"redis_url: unknown scheme {u.scheme!r} (redis, rediss, redis+sentinel, "
                         "redis+cluster)")
    netloc = u.netloc.rpartition("@")[2]
    password = unquote(u.password) if u.password else None
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":")
        hosts.append((host or "127.0.0.1", int(port or (26379 if scheme == "redis+sentinel" else 6379))))
    parts = [p for p in u.path.split("/") if p]
    if scheme == "redis+sentinel":
        if not parts:
            raise ValueError("redis_url: a sentinel URL needs the service name: "
                             "redis+sentinel://host:26379/mymaster")
        return RedisTarget("sentinel", hosts, password, int(parts[1]) if len(parts) > 1 else 0,
                           parts[0])
    return RedisTarget("cluster", hosts, password, 0, "")


def connect(url: str) -> tuple[Any, RedisTarget]:
    """An asyncio client (hiredis-parsed) for the URL, and what kind of Redis it is."""
    target = parse(url)
    if target.kind == "single":
        import redis.asyncio as aioredis

        return aioredis.from_url(url, socket_keepalive=True, health_check_interval=15), target
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(target.hosts, sentinel_kwargs={"password": target.password} if target.password
                            else None, password=target.password, db=target.db)
        return sentinel.master_for(target.service), target
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    nodes = [ClusterNode(h, p) for h, p in target.hosts]
    return RedisCluster(startup_nodes=nodes, password=target.password), target


def key_prefix(prefix: str, target: RedisTarget) -> str:
    """On a Redis Cluster, a hash tag keeps a deployment's state keys in one slot."""
    return "{" + prefix + "}" if target.sharded else prefix


def redis_prefix(cfg: Config) -> str:
    """The deployment's key prefix, hash-tagged on a Redis Cluster so that one Lua call's
    keys (webhook claims and outbox, cluster state) share a slot."""
    return key_prefix(cfg.key_prefix, parse(cfg.redis_url)) if cfg.redis_url else cfg.key_prefix
