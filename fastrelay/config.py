"""Configuration: defaults, then a TOML file, then environment variables (FASTRELAY_*, and
Reverb's REVERB_* names so a Reverb deployment switches over with no edits)."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .apps import App


class ConfigError(ValueError):
    """A bad setting; the message names the key and what is wrong with it."""


@dataclass
class Config:
    host: str = "0.0.0.0"
    port: int = 6001
    workers: int = 0  # 0: one per core when redis_url is set, else 1
    data_dir: str = "data"
    redis_url: str = ""
    database_url: str = ""
    key_prefix: str = "fastrelay"
    node_timeout: float = 20.0  # a node silent this long is dead; its cluster entries are removed
    cluster_secret: str = ""  # keys bus MACs and idempotency hashes; generated if empty
    audit: bool = True
    audit_retention_days: float = 7.0
    audit_journal: bool = True  # off: a crash loses what the audit queue held (diagnostics only)
    # seconds a batch waits to fill (or audit_batch_rows rows): one SQLite commit per batch
    # costs ~0.3 ms of CPU, so sparse events share one; reads flush first
    audit_flush_interval: float = 0.1
    audit_batch_rows: int = 1000
    log_level: str = "info"
    log_format: str = "text"  # text | json
    # timeouts, seconds
    activity_timeout: float = 120.0  # sent to clients; the server pings after this silence
    pong_timeout: float = 30.0
    request_timeout: float = 10.0  # a partial HTTP request (slowloris)
    idle_timeout: float = 120.0  # an idle keep-alive HTTP connection
    closing_timeout: float = 2.0
    sweep_interval: float = 1.0
    # sizes, bytes
    max_header_size: int = 16384
    max_body_size: int = 1_048_576
    max_message_size: int = 102_400  # one WebSocket message from a client
    max_outbound_buffer: int = 1_048_576  # unsent bytes per socket before 4100
    max_channels_per_connection: int = 500
    max_connections: int = 0  # per node; 0: unlimited
    event_ttl: float = 60.0
    cache_ttl: float = 1800.0
    # operations (metrics, health, console, TLS, shutdown, apps in PostgreSQL)
    metrics_port: int = 0  # 0: /metrics on the main port; else only there (with /up, /ready)
    admin_token: str = ""  # enables /console; sent as ?token= once, then a cookie
    tls_cert: str = ""  # PEM certificate chain: serve https/wss directly
    tls_key: str = ""
    shutdown_timeout: float = 10.0  # bound on draining sockets and flushing the audit
    ready_timeout: float = 1.0  # per dependency check in /ready
    ready_max_loop_lag: float = 1.0  # seconds; /ready answers 503 beyond it
    apps_source: str = "config"  # config (TOML and env) | postgres
    apps_database_url: str = ""  # default: database_url
    apps_table: str = "apps"
    apps_refresh_interval: float = 10.0
    # webhooks (endpoints are per app: App.webhooks)
    webhook_delay: float = 3.0  # channel_vacated / member_removed wait this long for a return
    webhook_flush_interval: float = 0.1  # one POST per endpoint per interval (batches)
    webhook_timeout: float = 5.0  # per POST
    webhook_retry_window: float = 300.0  # then dead letters (`fastrelay webhooks failed`)
    webhook_retry_base: float = 1.0  # first back-off; doubles up to webhook_retry_max
    webhook_retry_max: float = 60.0
    webhook_batch_max: int = 1000  # events per POST
    webhook_reclaim_idle: float = 30.0  # Redis: a silent node's entries are taken over after
    apps: list[App] = field(default_factory=list)
    config_path: str = ""


_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, value: Any, kind: Any) -> Any:
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _BOOL_TRUE:
                return True
            if text in _BOOL_FALSE:
                return False
            raise ValueError
        if kind_name == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind_name == "float":
            return float(value)
        if kind_name == "str":
            if not isinstance(value, str | int):
                raise ValueError
            return str(value)
        if kind_name.startswith("list"):
            if isinstance(value, str) and value.lstrip().startswith("["):
                import json

                value = json.loads(value)  # JSON from the environment (e.g. webhooks)
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind_name}, got {value!r}") from None
    return value


def _apply(target: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        if key not in known or key in ("apps", "config_path"):
            raise ConfigError(f"{where}{key}: unknown setting (known: {', '.join(sorted(known))})")
        setattr(target, key, _coerce(f"{where}{key}", value, known[key].type))


def _app_from(values: dict[str, Any], where: str) -> App:
    for required in ("id", "key", "secret"):
        if not str(values.get(required, "")).strip():
            raise ConfigError(f"{where}{required}: required")
    app = App(id=str(values["id"]), key=str(values["key"]), secret=str(values["secret"]))
    _apply(app, {k: v for k, v in values.items() if k not in ("id", "key", "secret")}, where)
    app.validate(where)
    return app


def _env_settings(env: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    names = {f.name for f in fields(Config)} - {"apps", "config_path"}
    for name in names:
        value = env.get("FASTRELAY_" + name.upper())
        if value is not None:
            out[name] = value
    return out


def _reverb_settings(env: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    port = env.get("REVERB_SERVER_PORT") or env.get("REVERB_PORT")
    if port:
        out["port"] = port
    host = env.get("REVERB_SERVER_HOST") or env.get("REVERB_HOST")
    if host:
        # REVERB_HOST is often the public name clients use; bind to it only if it is local
        try:
            ipaddress.ip_address(host)
            out["host"] = host
        except ValueError:
            if host == "localhost":
                out["host"] = "127.0.0.1"
    return out


def _env_app(env: dict[str, str]) -> App | None:
    prefix = "FASTRELAY_APP_"
    if env.get(prefix + "ID") or env.get(prefix + "KEY"):
        values: dict[str, Any] = {}
        app_fields = {f.name for f in fields(App)}
        for name in app_fields:
            value = env.get(prefix + name.upper())
            if value is not None:
                values[name] = value
        return _app_from(values, "FASTRELAY_APP_")
    if env.get("REVERB_APP_KEY"):
        return _app_from(
            {
                "id": env.get("REVERB_APP_ID", ""),
                "key": env["REVERB_APP_KEY"],
                "secret": env.get("REVERB_APP_SECRET", ""),
            },
            "REVERB_APP_",
        )
    return None


def load(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    """Reads the TOML file (explicit, $FASTRELAY_CONFIG, or ./fastrelay.toml) and the env."""
    env = dict(os.environ) if env is None else env
    cfg = Config()
    path = path or env.get("FASTRELAY_CONFIG") or ""
    if not path and Path("fastrelay.toml").exists():
        path = "fastrelay.toml"
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        apps_raw = raw.pop("apps", [])
        _apply(cfg, raw, "")
        if not isinstance(apps_raw, list):
            raise ConfigError("apps: expected a list of [[apps]] tables")
        for i, a in enumerate(apps_raw):
            cfg.apps.append(_app_from(a, f"apps[{i}]."))
        cfg.config_path = str(path)
    _apply(cfg, _reverb_settings(env), "REVERB_")
    _apply(cfg, _env_settings(env), "FASTRELAY_")
    app = _env_app(env)
    if app is not None:
        cfg.apps = [a for a in cfg.apps if a.id != app.id] + [app]
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port: {cfg.port} is not a TCP port")
    if cfg.workers < 0:
        raise ConfigError(f"workers: must be 0 (automatic) or more, got {cfg.workers}")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {cfg.log_format!r}")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {cfg.log_level!r}")
    if cfg.apps_source not in ("config", "postgres"):
        raise ConfigError(f"apps_source: expected config or postgres, got {cfg.apps_source!r}")
    if cfg.apps_source == "postgres" and not (cfg.apps_database_url or cfg.database_url):
        raise ConfigError("apps_source: postgres needs apps_database_url or database_url")
    if not cfg.apps_table.replace("_", "").isalnum():
        raise ConfigError(f"apps_table: {cfg.apps_table!r} is not a plain table name")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_cert and tls_key: set both (or neither)")
    if cfg.metrics_port and not 0 < cfg.metrics_port < 65536:
        raise ConfigError(f"metrics_port: {cfg.metrics_port} is not a TCP port")
    if cfg.redis_url:
        from .redisconn import parse

        try:
            parse(cfg.redis_url)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    seen_ids: set[str] = set()
    seen_keys: set[str] = set()
    for app in cfg.apps:
        if app.id in seen_ids:
            raise ConfigError(f"apps: app id {app.id!r} is configured twice")
        if app.key in seen_keys:
            raise ConfigError(f"apps: app key {app.key!r} is configured twice")
        seen_ids.add(app.id)
        seen_keys.add(app.key)
