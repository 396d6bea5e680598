"""The `fastrelay` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .apps import AppManager, development_app
from .config import Config, ConfigError, load


def _load(args: argparse.Namespace) -> Config:
    try:
        cfg = load(getattr(args, "config", None))
    except ConfigError as e:
        print(f"fastrelay: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for name in ("host", "port", "workers"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from . import logs
    from .server import serve

    cfg = _load(args)
    logs.setup(cfg.log_level, cfg.log_format)
    if not cfg.apps:
        app = development_app(Path(cfg.data_dir))
        cfg.apps.append(app)
        print(
            "fastrelay: no app configured, using a development app\n"
            f"  app id:     {app.id}\n  app key:    {app.key}\n  app secret: {app.secret}\n"
            f"  connect:    ws://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}"
            f":{cfg.port}/app/{app.key}?protocol=7",
            file=sys.stderr, flush=True,
        )
    if cfg.workers > 1:
        print("fastrelay: --workers above 1 needs the Redis bus (redis_url), not built yet",
              file=sys.stderr)
        return 2
    uvloop.run(serve(cfg, AppManager(cfg.apps)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrelay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--config", help="TOML file (default: $FASTRELAY_CONFIG or ./fastrelay.toml)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    return args.func(args)
