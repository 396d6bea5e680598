"""`fastrelay webhooks failed` and `fastrelay webhooks redeliver`: the dead letters, read and
re-queued straight in the outbox (Redis stream or SQLite file) the servers use."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .manager import open_outbox


async def _with_outbox(cfg: Any, fn: Any) -> Any:
    redis = None
    if cfg.redis_url:
        from ..redisconn import connect

        redis = connect(cfg.redis_url)[0]
    outbox = open_outbox(cfg, redis)
    try:
        return await fn(outbox)
    finally:
        await outbox.close()
        if redis is not None:
            await redis.aclose()


def failed(cfg: Any, limit: int = 1000, as_json: bool = False) -> list[dict[str, Any]]:
    rows = asyncio.run(_with_outbox(cfg, lambda o: o.failed(limit)))
    for r in rows:
        if as_json:
            print(json.dumps(r), flush=True)
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["failed_at"] or 0))
            print(f"{r['id']}\tapp {r['app_id']}\t{r['url']}\tfailed {when}\t{r['error']}\t"
                  f"{r['event']}")
    return rows


def redeliver(cfg: Any, ids: list[str] | None) -> int:
    return asyncio.run(_with_outbox(cfg, lambda o: o.redeliver(ids)))
