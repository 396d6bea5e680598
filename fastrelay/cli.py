"""The `fastrelay` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .apps import AppManager, development_app, load_development_app
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


def raise_fd_limit() -> None:
    """Every connection is a file descriptor: take the whole hard limit we are allowed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from . import logs
    from .server import serve

    cfg = _load(args)
    logs.setup(cfg.log_level, cfg.log_format)
    raise_fd_limit()
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
    if cfg.workers == 0:
        cfg.workers = (os.cpu_count() or 1) if cfg.redis_url else 1
    if cfg.workers > 1:
        if not cfg.redis_url:
            print("fastrelay: workers above 1 need the Redis bus: set redis_url "
                  "(FASTRELAY_REDIS_URL=redis://127.0.0.1:6379)", file=sys.stderr)
            return 2
        from .server import cluster_secret
        from .supervisor import Supervisor

        cluster_secret(cfg)  # made once, before the workers would race to make it
        from .server import remove_pid_file, write_pid_file

        write_pid_file(cfg)  # `fastrelay reload` signals the supervisor, which owns reloads
        try:
            return Supervisor(cfg).run()
        finally:
            remove_pid_file(cfg)
    uvloop.run(serve(cfg, AppManager(cfg.apps)))
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from .webhooks import admin

    cfg = _load(args)
    if args.action == "failed":
        rows = admin.failed(cfg, args.limit, args.json)
        if not args.json:
            print(f"{len(rows)} failed webhook event(s)", file=sys.stderr)
        return 0
    if not args.ids and not args.all:
        print("fastrelay webhooks redeliver: give IDs or --all", file=sys.stderr)
        return 2
    n = admin.redeliver(cfg, None if args.all else args.ids)
    print(f"{n} webhook event(s) queued for redelivery", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- operator commands


def _fail(message: str, code: int = 1) -> int:
    print(f"fastrelay: {message}", file=sys.stderr)
    return code


def _target(args: argparse.Namespace, cfg: Config):  # noqa: ANN202
    """(http base URL, ws base URL, ssl context or None, app) for send, listen and events."""
    import ssl

    from .doctor import url_host

    if args.url:
        base = args.url.rstrip("/")
    else:
        base = f"{'https' if cfg.tls_cert else 'http'}://{url_host(cfg.host)}:{cfg.port}"
    ctx = None
    if base.startswith("https"):
        ctx = ssl._create_unverified_context() if args.insecure else ssl.create_default_context()  # noqa: S323
    apps = _apps_for(cfg)
    if not apps:
        raise SystemExit(_fail("no app configured: run `fastrelay apps create NAME` or set "
                               "FASTRELAY_APP_ID, FASTRELAY_APP_KEY and FASTRELAY_APP_SECRET", 2))
    if args.app:
        found = [a for a in apps if args.app in (a.id, a.key, a.name)]
        if not found:
            raise SystemExit(_fail(f"no app {args.app!r}; known: {', '.join(a.id for a in apps)}", 2))
        app = found[0]
    elif len(apps) > 1:
        raise SystemExit(_fail(f"{len(apps)} apps configured: choose one with --app "
                               f"({', '.join(a.id for a in apps)})", 2))
    else:
        app = apps[0]
    return base, "ws" + base[4:], ctx, app


def _apps_for(cfg: Config) -> list:
    if cfg.apps_source == "postgres":
        import asyncio

        from .apps import PostgresApps

        return cfg.apps + asyncio.run(PostgresApps(cfg.apps_database_url or cfg.database_url,
                                                   cfg.apps_table).load())
    if not cfg.apps:
        app = load_development_app(Path(cfg.data_dir))
        return [app] if app is not None else []
    return cfg.apps


def cmd_send(args: argparse.Namespace) -> int:
    import json

    target = _target(args, _load(args))
    app = target[3]
    body = json.dumps({"name": args.event, "channels": args.channel, "data": args.data}).encode()
    status, answer = _signed_call(target, "POST", f"/apps/{app.id}/events", body=body,
                                  content_type="application/json")
    if not 200 <= status < 300:
        detail = answer.decode(errors="replace")[:300]
        hint = {401: " (the app secret here differs from the server's?)",
                404: " (the server does not know this app id)",
                429: " (the app's rate limit)", 503: " (the server is draining or its audit is full)"}
        return _fail(f"the server answered {status}: {detail}{hint.get(status, '')}")
    print(f"sent {args.event} to {', '.join(args.channel)} (app {app.id})", file=sys.stderr)
    return 0


def _signed_call(target: tuple, method: str, path: str, params: dict[str, str] | None = None,
                 body: bytes | None = None, content_type: str | None = None) -> tuple[int, bytes]:
    """A signed request to the server's HTTP API, for a `_target`: (status, the answer's
    bytes), errors included. A server that cannot be reached ends the command."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from .signatures import sign_api_request

    base, _, ctx, app = target
    query = urllib.parse.urlencode(sign_api_request(app.key, app.secret, method, path, body or b"",
                                                    params=params))
    if body is None and method == "POST":
        body = b""
    req = urllib.request.Request(f"{base}{path}?{query}", data=body, method=method,
                                 headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(_fail(f"cannot reach {base}: {getattr(e, 'reason', e)}. Is the server "
                               "running (`fastrelay serve`), and do --url / host / port point at "
                               "it?")) from None


def cmd_events(args: argparse.Namespace) -> int:
    """`events tail`: the audit log's newest events, then new ones as they come;
    `events replay ID`: sends a stored event again to its channels."""
    import json
    import time

    target = _target(args, _load(args))  # once: a poll only signs a new request

    def call(method: str, path: str, params: dict[str, str] | None = None) -> tuple[int, dict]:
        status, answer = _signed_call(target, method, path, params)
        return status, json.loads(answer or b"{}")

    if args.events_command == "replay":
        status, body = call("POST", f"/api/events/{args.id}/replay")
        if status != 202:
            return _fail(f"the server answered {status}: {body.get('error', body)}")
        print(f"replayed {args.id} as {body['id']}", file=sys.stderr)
        return 0
    params = {"limit": str(args.limit)}
    if args.channel:
        params["channel"] = args.channel
    if args.event:
        params["event"] = args.event
    seen: set[str] = set()
    since: float | None = None
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        q = dict(params, since=repr(since)) if since is not None else params
        status, body = call("GET", "/api/events", q)
        if status != 200:
            return _fail(f"the server answered {status}: {body.get('error', body)}")
        for ev in reversed(body["events"]):  # oldest first on the screen
            if ev["id"] not in seen:
                seen.add(ev["id"])
                print(json.dumps(ev), flush=True)
                since = ev["accepted_at"] if since is None else max(since, ev["accepted_at"])
        if not args.follow or (deadline is not None and time.monotonic() > deadline):
            return 0
        time.sleep(args.interval)


def cmd_listen(args: argparse.Namespace) -> int:
    import asyncio

    cfg = _load(args)
    _, ws_base, ctx, app = _target(args, cfg)
    try:
        return asyncio.run(_listen(args, ws_base, ctx, app))
    except KeyboardInterrupt:
        return 0


async def _listen(args: argparse.Namespace, ws_base: str, ctx, app) -> int:  # noqa: ANN001
    import asyncio
    import json

    import picows

    from .signatures import sign_channel

    done: asyncio.Future = asyncio.get_running_loop().create_future()
    state = {"n": 0}
    channels = list(args.channel)

    class Listener(picows.WSListener):
        def on_ws_connected(self, transport: picows.WSTransport) -> None:
            self.t = transport

        def send(self, event: str, data: dict) -> None:
            self.t.send(picows.WSMsgType.TEXT, json.dumps({"event": event, "data": data}).encode())

        def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
            if frame.msg_type == picows.WSMsgType.CLOSE:
                if not done.done():
                    done.set_result(_fail(f"the server closed the connection ({frame.get_close_code()} "
                                          f"{frame.get_close_message()!r})"))
                return
            if frame.msg_type != picows.WSMsgType.TEXT:
                return
            msg = json.loads(frame.get_payload_as_bytes())
            ev = msg.get("event", "")
            if ev == "pusher:connection_established":
                socket_id = json.loads(msg["data"])["socket_id"]
                for ch in channels:
                    sub: dict = {"channel": ch}
                    if ch.startswith("presence-"):
                        cd = json.dumps({"user_id": args.user or f"cli-{os.getpid()}", "user_info": {}})
                        sub["channel_data"] = cd
                        sub["auth"] = sign_channel(app.key, app.secret, socket_id, ch, cd)
                    elif ch.startswith("private-"):
                        sub["auth"] = sign_channel(app.key, app.secret, socket_id, ch)
                    self.send("pusher:subscribe", sub)
            elif ev == "pusher:ping":
                self.send("pusher:pong", {})
            elif ev == "pusher_internal:subscription_succeeded":
                print(f"listening on {msg.get('channel')} (app {app.id}); Ctrl-C to stop",
                      file=sys.stderr, flush=True)
            elif ev in ("pusher:error", "pusher:subscription_error"):
                print(f"fastrelay: {ev}: {msg.get('data')}", file=sys.stderr, flush=True)
            elif not ev.startswith("pusher"):
                data = msg.get("data")
                if isinstance(data, str):
                    try:
                        data = json.loads(data)
                    except ValueError:
                        pass
                out = {"channel": msg.get("channel"), "event": ev, "data": data}
                if "user_id" in msg:
                    out["user_id"] = msg["user_id"]
                print(json.dumps(out), flush=True)
                state["n"] += 1
                if args.count and state["n"] >= args.count and not done.done():
                    done.set_result(0)

        def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
            if not done.done():
                done.set_result(_fail("disconnected"))

    url = f"{ws_base}/app/{app.key}?protocol=7&client=fastrelay-cli&version=1"
    try:
        transport, _ = await picows.ws_connect(Listener, url, ssl_context=ctx)
    except (OSError, picows.WSError) as e:
        return _fail(f"cannot connect to {ws_base}: {e}. Is the server running (`fastrelay serve`)?")
    try:
        return await asyncio.wait_for(done, args.timeout) if args.timeout else await done
    except TimeoutError:
        return 0 if not args.count else _fail(f"timed out after {state['n']} of {args.count} events")
    finally:
        transport.disconnect()


def cmd_apps(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import secrets as _secrets

    from .apps import PostgresApps, new_app

    cfg = _load(args)
    pg = (PostgresApps(cfg.apps_database_url or cfg.database_url, cfg.apps_table)
          if cfg.apps_source == "postgres" else None)
    toml_path = Path(args.config or cfg.config_path or "fastrelay.toml")
    if args.action == "list":
        apps = cfg.apps + (asyncio.run(pg.load()) if pg else [])
        if args.json:
            for a in apps:
                d = a.public()
                if args.show_secrets:
                    d["secret"] = a.secret
                print(json.dumps(d))
            return 0
        print(f"{'id':<12} {'key':<24} {'name':<20} enabled" + ("  secret" if args.show_secrets else ""))
        for a in apps:
            print(f"{a.id:<12} {a.key:<24} {a.name:<20} {str(a.enabled).lower():<7}"
                  + (f"  {a.secret}" if args.show_secrets else ""))
        if not apps:
            print("(no apps: `fastrelay apps create NAME`)", file=sys.stderr)
        return 0
    if args.action == "create":
        app = new_app(args.name)
        if pg is not None:
            asyncio.run(pg.create(app))
            where = f"PostgreSQL table {cfg.apps_table} (servers pick it up within " \
                    f"{cfg.apps_refresh_interval:g} s)"
        else:
            text = toml_path.read_text() if toml_path.exists() else ""
            block = (f'\n[[apps]]\nid = "{app.id}"\nkey = "{app.key}"\nsecret = "{app.secret}"\n'
                     f'name = {json.dumps(app.name)}\n')
            toml_path.write_text(text + ("\n" if text and not text.endswith("\n") else "") + block)
            toml_path.chmod(0o600)
            where = f"{toml_path} (run `fastrelay reload` to load it into a running server)"
        if args.json:
            print(json.dumps({"id": app.id, "key": app.key, "secret": app.secret, "name": app.name}))
        else:
            print(f"app id:     {app.id}\napp key:    {app.key}\napp secret: {app.secret}")
        print(f"written to {where}", file=sys.stderr)
        return 0
    # rotate-secret
    secret = _secrets.token_hex(20)
    if pg is not None:
        if not asyncio.run(pg.rotate_secret(args.id, secret)):
            return _fail(f"no app {args.id!r} in table {cfg.apps_table}")
    else:
        if not _rotate_in_toml(toml_path, args.id, secret):
            env_hint = (" It comes from FASTRELAY_APP_* variables: change FASTRELAY_APP_SECRET there."
                        if any(a.id == args.id for a in cfg.apps) else "")
            return _fail(f"no [[apps]] table with id {args.id!r} in {toml_path}.{env_hint}")
    print(f"app secret: {secret}")
    print("old signatures stop working once servers load the new secret "
          "(`fastrelay reload`, or the next PostgreSQL refresh)", file=sys.stderr)
    return 0


def _rotate_in_toml(path: Path, app_id: str, secret: str) -> bool:
    import re
    import tomllib

    if not path.exists():
        return False
    lines = path.read_text().splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.strip() == "[[apps]]"]
    for start in starts:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
                   len(lines))
        try:
            block = tomllib.loads("".join(lines[start + 1:end]))
        except tomllib.TOMLDecodeError:
            continue
        if str(block.get("id")) != app_id:
            continue
        for i in range(start + 1, end):
            if re.match(r"\s*secret\s*=", lines[i]):
                lines[i] = f'secret = "{secret}"\n'
                path.write_text("".join(lines))
                return True
    return False


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor

    return doctor(args.config)


def cmd_reload(args: argparse.Namespace) -> int:
    import signal

    from .server import pid_file

    cfg = _load(args)
    path = pid_file(cfg)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return _fail(f"no running server found ({path} is missing or stale): is `fastrelay serve` "
                     "running with this data_dir?")
    print(f"reload requested (SIGHUP to {pid})", file=sys.stderr)
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file (default: $FASTRELAY_CONFIG or ./fastrelay.toml)")
    p.add_argument("--app", help="app id, key or name (needed when several are configured)")
    p.add_argument("--url", help="server base URL (default: from host, port and tls_cert)")
    p.add_argument("--insecure", action="store_true", help="accept a self-signed TLS certificate")


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
    p = sub.add_parser("webhooks", help="dead-lettered webhooks: list and redeliver")
    wsub = p.add_subparsers(dest="action", required=True)
    w = wsub.add_parser("failed", help="list webhook events that exhausted their retries")
    w.add_argument("--config")
    w.add_argument("--limit", type=int, default=1000)
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    w.set_defaults(func=cmd_webhooks)
    w = wsub.add_parser("redeliver", help="queue failed webhook events for delivery again")
    w.add_argument("--config")
    w.add_argument("ids", nargs="*", metavar="ID")
    w.add_argument("--all", action="store_true")
    w.set_defaults(func=cmd_webhooks)
    p = sub.add_parser("send", help="send an event (signed) to a channel")
    _client_args(p)
    p.add_argument("channel", nargs="+", metavar="CHANNEL", help="one or more channels, then EVENT DATA")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("data", metavar="DATA", help="a string; JSON is sent as is")
    p.set_defaults(func=cmd_send)
    p = sub.add_parser("events", help="the audit log: tail it, replay an event")
    esub = p.add_subparsers(dest="events_command", required=True)
    e = esub.add_parser("tail", help="print the newest events (JSON lines), then follow")
    _client_args(e)
    e.add_argument("--channel")
    e.add_argument("--event")
    e.add_argument("--limit", type=int, default=20)
    e.add_argument("--no-follow", dest="follow", action="store_false", help="print and exit")
    e.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    e.add_argument("--timeout", type=float, default=0, help="stop following after this many seconds")
    e.set_defaults(func=cmd_events)
    e = esub.add_parser("replay", help="send a stored event again to its channels")
    _client_args(e)
    e.add_argument("id", metavar="ID")
    e.set_defaults(func=cmd_events)
    p = sub.add_parser("listen", help="print a channel's events as JSON lines")
    _client_args(p)
    p.add_argument("channel", nargs="+", metavar="CHANNEL")
    p.add_argument("--user", help="user id for presence channels (default cli-PID)")
    p.add_argument("--count", type=int, default=0, help="exit after this many events")
    p.add_argument("--timeout", type=float, default=0, help="exit after this many seconds")
    p.set_defaults(func=cmd_listen)
    p = sub.add_parser("apps", help="list, create apps and rotate their secrets")
    asub = p.add_subparsers(dest="action", required=True)
    a = asub.add_parser("list", help="the configured apps")
    a.add_argument("--config")
    a.add_argument("--json", action="store_true")
    a.add_argument("--show-secrets", action="store_true")
    a.set_defaults(func=cmd_apps)
    a = asub.add_parser("create", help="a new app: prints its id, key and secret")
    a.add_argument("--config")
    a.add_argument("--json", action="store_true")
    a.add_argument("name")
    a.set_defaults(func=cmd_apps)
    a = asub.add_parser("rotate-secret", help="a new secret for an app")
    a.add_argument("--config")
    a.add_argument("id")
    a.set_defaults(func=cmd_apps)
    p = sub.add_parser("doctor", help="check the configuration and the machine")
    p.add_argument("--config")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("reload", help="restart the running server without downtime (SIGHUP)")
    p.add_argument("--config")
    p.set_defaults(func=cmd_reload)
    args = parser.parse_args(argv)
    return args.func(args)
