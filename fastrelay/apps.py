"""Apps: who may connect and publish, with each app's switches and limits."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path


@dataclass(eq=False)
class App:
    id: str
    key: str
    secret: str
    name: str = ""
    enabled: bool = True
    max_connections: int = 0  # 0: unlimited
    client_events: bool = True
    client_event_rate: int = 10  # per connection per second (Pusher's limit)
    user_authentication: bool = False  # require pusher:signin within user_auth_timeout
    user_auth_timeout: float = 30.0
    subscription_count: bool = False  # opt-in pusher_internal:subscription_count
    max_presence_members: int = 100
    max_presence_user_info: int = 1024
    max_event_payload: int = 10_240
    max_channels_per_event: int = 100
    max_batch_size: int = 10
    rate_limit: float = 0.0  # accepted events per second over the APIs; 0: unlimited
    rate_burst: int = 0  # 0: one second's worth
    allowed_origins: list[str] = field(default_factory=list)
    audit_client_events: bool = False
    # webhook endpoints: [{url, event_types: [...], filter: {channel_name_starts_with,
    # channel_name_ends_with}, headers: {...}}]; env FASTRELAY_APP_WEBHOOKS takes JSON
    webhooks: list[dict] = field(default_factory=list)

    def validate(self, where: str = "") -> None:
        from .config import ConfigError

        if ":" in self.key:
            raise ConfigError(f"{where}key: must not contain ':' (auth strings are key:signature)")
        for name in ("max_connections", "max_presence_members", "max_event_payload"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}{name}: must not be negative")
        if self.webhooks:
            from .webhooks.manager import endpoint_error

            for i, ep in enumerate(self.webhooks):
                problem = endpoint_error(ep)
                if problem is not None:
                    raise ConfigError(f"{where}webhooks[{i}]: {problem}")

    @cached_property
    def secret_bytes(self) -> bytes:  # read on every signed request: encoded once
        return self.secret.encode()

    def origin_allowed(self, origin: str | None) -> bool:
        if not self.allowed_origins or "*" in self.allowed_origins:
            return True
        if origin is None:
            return False
        host = origin.split("://", 1)[-1].rstrip("/")
        for allowed in self.allowed_origins:
            a = allowed.split("://", 1)[-1].rstrip("/")
            if a == host or (a.startswith("*.") and host.endswith(a[1:])):
                return True
        return False

    def public(self) -> dict:
        """What may be shown: everything but the secret."""
        d = asdict(self)
        d.pop("secret")
        return d


class AppManager:
    """Looks apps up by id (HTTP API) and by key (WebSocket, intake)."""

    def __init__(self, apps: list[App]) -> None:
        self.ids: dict[str, App] = {}  # by id: the compiled trigger reads it directly
        self._by_key: dict[str, App] = {}
        for app in apps:
            self.add(app)

    def add(self, app: App) -> None:
        self.ids[app.id] = app
        self._by_key[app.key] = app

    def by_id(self, app_id: str) -> App | None:
        return self.ids.get(app_id)

    def by_key(self, key: str) -> App | None:
        return self._by_key.get(key)

    def all(self) -> list[App]:
        return list(self.ids.values())

    def replace(self, apps: list[App]) -> None:
        """Swaps the whole set at once (a refresh from PostgreSQL); open sockets keep theirs."""
        by_id = {a.id: a for a in apps}
        by_key = {a.key: a for a in apps}
        self.ids, self._by_key = by_id, by_key


def new_app(name: str = "") -> App:
    """Fresh credentials: a numeric id, a 20-hex-digit key and a 40-hex-digit secret."""
    return App(id=str(secrets.randbelow(9_000_000) + 1_000_000), key=secrets.token_hex(10),
               secret=secrets.token_hex(20), name=name)


class PostgresApps:
    """Apps kept in a PostgreSQL table (apps_source = "postgres"). Columns: id, key, secret,
    name, enabled, and `options` (JSON: any other App setting, e.g. {"rate_limit": 100})."""

    def __init__(self, url: str, table: str = "apps") -> None:
        self.url = url
        self.table = table
        self._schema_done = False  # the table is created (if missing) on the first connect only

    def schema(self) -> str:
        return (f"CREATE TABLE IF NOT EXISTS {self.table} (id text PRIMARY KEY, key text NOT NULL "
                f"UNIQUE, secret text NOT NULL, name text NOT NULL DEFAULT '', enabled boolean NOT "
                f"NULL DEFAULT true, options jsonb NOT NULL DEFAULT '{{}}', created_at timestamptz "
                f"NOT NULL DEFAULT now())")

    async def _connect(self):  # noqa: ANN202
        import asyncpg

        conn = await asyncpg.connect(self.url, timeout=5)
        if not self._schema_done:
            try:
                await conn.execute(self.schema())
            except BaseException:
                await conn.close()
                raise
            self._schema_done = True
        return conn

    async def load(self) -> list[App]:
        from .config import ConfigError, _app_from

        conn = await self._connect()
        try:
            rows = await conn.fetch(f"SELECT id, key, secret, name, enabled, options::text AS options "
                                    f"FROM {self.table} ORDER BY created_at, id")
        finally:
            await conn.close()
        apps = []
        for r in rows:
            values = {**json.loads(r["options"] or "{}"), "id": r["id"], "key": r["key"],
                      "secret": r["secret"], "name": r["name"], "enabled": r["enabled"]}
            try:
                apps.append(_app_from(values, f"{self.table}[{r['id']}]."))
            except ConfigError as e:  # one bad row must not take the others down
                import logging

                logging.getLogger("fastrelay.apps").error("skipping app: %s", e)
        return apps

    async def create(self, app: App) -> None:
        conn = await self._connect()
        try:
            await conn.execute(f"INSERT INTO {self.table} (id, key, secret, name, enabled) "
                               f"VALUES ($1, $2, $3, $4, $5)", app.id, app.key, app.secret,
                               app.name, app.enabled)
        finally:
            await conn.close()

    async def rotate_secret(self, app_id: str, secret: str) -> bool:
        conn = await self._connect()
        try:
            done = await conn.execute(f"UPDATE {self.table} SET secret = $2 WHERE id = $1",
                                      app_id, secret)
        finally:
            await conn.close()
        return done.endswith(" 1")


def load_development_app(data_dir: Path) -> App | None:
    """The development app kept in the data dir (`development_app`), if there is one."""
    try:
        d = json.loads((data_dir / "dev-app.json").read_text())
        return App(id=d["id"], key=d["key"], secret=d["secret"], name="development")
    except (OSError, ValueError, KeyError):
        return None


def development_app(data_dir: Path) -> App:
    """The app used when none is configured, kept in the data dir so restarts keep its key."""
    app = load_development_app(data_dir)
    if app is not None:
        return app
    app = App(
        id=str(secrets.randbelow(900000) + 100000),
        key=secrets.token_hex(10),
        secret=secrets.token_hex(10),
        name="development",
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "dev-app.json"
    path.write_text(json.dumps({"id": app.id, "key": app.key, "secret": app.secret}))
    path.chmod(0o600)
    return app
