"""Webhooks: channel and member edges, client events, cache misses and subscription counts,
POSTed to each app's endpoints with Pusher's body and signature.

    manager = WebhookManager(cfg, apps, redis, node=node)
    # redis: None -> SQLite outbox in data_dir; node: its cluster state (when clustered)
    # tells apart occupied/vacated edges that other nodes' subscribers make node-local
    await manager.start()
    node.webhooks = manager        # the node's edge hooks call it (O(1))
    await manager.close()          # flushes recorded edges to the outbox
"""

from __future__ import annotations

from .manager import EVENT_TYPES, WebhookManager, WebhookStats, endpoint_error, open_outbox
from .outbox import Item, Outbox, RedisOutbox, SqliteOutbox

__all__ = ["EVENT_TYPES", "Item", "Outbox", "RedisOutbox", "SqliteOutbox", "WebhookManager",
           "WebhookStats", "endpoint_error", "open_outbox"]
