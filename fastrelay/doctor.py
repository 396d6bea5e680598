"""`fastrelay doctor`: checks the configuration and the machine, and says what to fix.

Each check prints one line: `ok`, `warn` (works, but look at it) or `FAIL` (will not work),
with the fix on the next line. The exit status is 1 when anything failed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import ssl
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load
from .logs import redact_url


@dataclass
class Report:
    lines: list[tuple[str, str, str]] = field(default_factory=list)  # (level, what, fix)

    def ok(self, what: str) -> None:
        self.lines.append(("ok", what, ""))

    def warn(self, what: str, fix: str = "") -> None:
        self.lines.append(("warn", what, fix))

    def fail(self, what: str, fix: str = "") -> None:
        self.lines.append(("FAIL", what, fix))

    @property
    def failed(self) -> bool:
        return any(level == "FAIL" for level, _, _ in self.lines)

    def print(self, out: Any = sys.stdout) -> None:
        for level, what, fix in self.lines:
            print(f"{level:>4}  {what}", file=out)
            if fix:
                print(f"      fix: {fix}", file=out)
        n_fail = sum(1 for lv, _, _ in self.lines if lv == "FAIL")
        n_warn = sum(1 for lv, _, _ in self.lines if lv == "warn")
        print(f"\n{n_fail} problem(s), {n_warn} warning(s)", file=out)


def run(config_path: str | None = None, env: dict[str, str] | None = None) -> Report:
    r = Report()
    try:
        cfg = load(config_path, env)
    except ConfigError as e:
        r.fail(f"configuration: {e}", "correct that setting in the TOML file or the environment")
        return r
    where = cfg.config_path or "defaults and environment (no TOML file)"
    r.ok(f"configuration loads ({where})")
    check_apps(cfg, r)
    check_port(r, cfg.host, cfg.port, "port")
    if cfg.metrics_port:
        check_port(r, cfg.host, cfg.metrics_port, "metrics_port")
    check_data_dir(cfg, r)
    check_fds(cfg, r)
    check_somaxconn(r)
    check_redis(cfg, r)
    check_postgres(cfg, r)
    check_tls(cfg, r)
    check_console(cfg, r)
    return r


def check_apps(cfg: Config, r: Report) -> None:
    if cfg.apps_source == "postgres":
        r.ok(f"apps come from PostgreSQL table {cfg.apps_table!r} (checked below)")
    if not cfg.apps and cfg.apps_source != "postgres":
        r.warn("no app configured: `fastrelay serve` will make a development app",
               "run `fastrelay apps create NAME`, or add an [[apps]] table with id, key and secret")
        return
    for app in cfg.apps:
        if len(app.secret) < 16:
            r.warn(f"app {app.id}: the secret is short ({len(app.secret)} characters)",
                   f"run `fastrelay apps rotate-secret {app.id}` (or set a 32+ character secret)")
    if cfg.apps:
        r.ok(f"{len(cfg.apps)} app(s) configured: {', '.join(a.id for a in cfg.apps)}")


def url_host(host: str) -> str:
    """The host part of a URL that reaches, from this machine, a server bound to `host`: the
    loopback address for a wildcard bind, IPv6 addresses in brackets."""
    h = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    return f"[{h}]" if ":" in h else h


def _fastrelay_answers(host: str, port: int) -> bool:
    h = url_host(host)
    for scheme in ("http", "https"):
        try:
            ctx = ssl._create_unverified_context() if scheme == "https" else None  # noqa: S323
            with urllib.request.urlopen(f"{scheme}://{h}:{port}/up", timeout=1, context=ctx) as resp:
                return resp.status == 200
        except Exception:  # noqa: S112 (any failure means: not a fastrelay)
            continue
    return False


def check_port(r: Report, host: str, port: int, name: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                if _fastrelay_answers(host, port):
                    r.ok(f"{name} {host}:{port}: a fastrelay is already listening there")
                else:
                    r.fail(f"{name} {host}:{port} is in use by another program",
                           f"stop it (`ss -ltnp 'sport = :{port}'` shows which) or set {name} "
                           f"(FASTRELAY_{name.upper()}) to a free port")
            elif e.errno == errno.EACCES:
                r.fail(f"{name} {port}: permission denied",
                       "use a port above 1023, or grant CAP_NET_BIND_SERVICE")
            elif e.errno == errno.EADDRNOTAVAIL:
                r.fail(f"host {host!r} is not an address of this machine",
                       "set host to 0.0.0.0 (all interfaces) or one of this machine's addresses")
            else:
                r.fail(f"{name} {host}:{port}: {e.strerror}")
            return
    r.ok(f"{name} {host}:{port} is free")


def check_data_dir(cfg: Config, r: Report) -> None:
    path = Path(cfg.data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".doctor-probe"
        probe.write_text("x")
        probe.unlink()
    except OSError as e:
        r.fail(f"data_dir {path}: not writable ({e.strerror})",
               "set data_dir (FASTRELAY_DATA_DIR) to a directory this user can write")
        return
    r.ok(f"data_dir {path.resolve()} is writable")


def check_fds(cfg: Config, r: Report) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(4096, cfg.max_connections * 2 if cfg.max_connections else 65536)
    if soft == resource.RLIM_INFINITY or soft >= want:
        r.ok(f"open files limit {soft} (each connection takes one)")
    elif soft < 4096:
        r.fail(f"open files limit is {soft}: at most about {soft - 50} connections",
               f"`ulimit -n {min(hard, 1048576) if hard != resource.RLIM_INFINITY else 1048576}` "
               "before starting, LimitNOFILE=1048576 in the systemd unit, or "
               "`ulimits: nofile: 1048576` in compose")
    else:
        r.warn(f"open files limit {soft} (hard {hard}): enough for about {soft - 50} connections",
               "raise it (ulimit -n / LimitNOFILE) for more")


def check_somaxconn(r: Report) -> None:
    try:
        value = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return
    if value < 1024:
        r.warn(f"net.core.somaxconn is {value}: bursts of new connections may be refused",
               "sysctl -w net.core.somaxconn=4096")


def check_redis(cfg: Config, r: Report) -> None:
    if not cfg.redis_url:
        if cfg.workers > 1:
            r.fail(f"workers = {cfg.workers} needs the Redis bus",
                   "set redis_url (FASTRELAY_REDIS_URL=redis://127.0.0.1:6379)")
        else:
            r.ok("Redis not configured (single worker, in-process bus)")
        return
    try:
        version = asyncio.run(_redis_probe(cfg.redis_url))
    except Exception as e:
        r.fail(f"Redis at {redact_url(cfg.redis_url)} is unreachable ({type(e).__name__}: {e})",
               "start Redis, or correct redis_url (FASTRELAY_REDIS_URL)")
        return
    r.ok(f"Redis {version} at {redact_url(cfg.redis_url)} answers")


async def _redis_probe(url: str) -> str:
    """The server's version, through the client the server uses (single, Sentinel, Cluster)."""
    from .redisconn import connect

    client = connect(url)[0]
    try:
        try:
            await asyncio.wait_for(client.ping(), 2)
        except TimeoutError:
            raise TimeoutError("no answer within 2 s") from None
        info = await asyncio.wait_for(client.info("server"), 2)
    finally:
        await client.aclose()
    if "redis_version" not in info and info:  # a Redis Cluster answers per node
        info = next(iter(info.values()))
    return info.get("redis_version", "?")


def check_postgres(cfg: Config, r: Report) -> None:
    urls = {}
    if cfg.database_url:
        urls["database_url"] = cfg.database_url
    if cfg.apps_source == "postgres":
        urls["apps_database_url"] = cfg.apps_database_url or cfg.database_url
    for name, url in urls.items():
        try:
            version, has_table = asyncio.run(_pg_probe(url, cfg.apps_table))
        except Exception as e:
            r.fail(f"PostgreSQL ({name}) at {redact_url(url)} is unreachable ({type(e).__name__}: {e})",
                   f"start PostgreSQL, or correct {name} (FASTRELAY_{name.upper()})")
            continue
        r.ok(f"PostgreSQL {version} ({name}) at {redact_url(url)} answers")
        if name == "apps_database_url" and not has_table:
            r.warn(f"table {cfg.apps_table!r} does not exist yet (created on first use)",
                   "run `fastrelay apps create NAME` to create it with a first app")


async def _pg_probe(url: str, table: str) -> tuple[str, bool]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=3)
    try:
        version = await conn.fetchval("SHOW server_version")
        has = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    finally:
        await conn.close()
    return str(version).split()[0], bool(has)


def check_tls(cfg: Config, r: Report) -> None:
    if not cfg.tls_cert:
        r.ok("TLS off (terminate it in front, or set tls_cert and tls_key)")
        return
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except FileNotFoundError as e:
        r.fail(f"TLS: {e.filename} not found", "correct tls_cert / tls_key")
        return
    except (ssl.SSLError, OSError) as e:
        r.fail(f"TLS: cannot load the certificate and key ({e})",
               "tls_cert is the PEM chain, tls_key the PEM private key that matches it")
        return
    try:
        import datetime

        from cryptography import x509

        cert = x509.load_pem_x509_certificate(Path(cfg.tls_cert).read_bytes())
        left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        if left.total_seconds() < 0:
            r.fail("TLS: the certificate has expired", "renew it")
            return
        if left.days < 14:
            r.warn(f"TLS: the certificate expires in {left.days} day(s)", "renew it")
            return
    except ImportError:
        pass
    r.ok(f"TLS certificate {cfg.tls_cert} loads")


def check_console(cfg: Config, r: Report) -> None:
    if not cfg.admin_token:
        r.ok("console off (set admin_token to enable /console)")
    elif len(cfg.admin_token) < 16:
        r.warn("admin_token is short", "use 32+ random characters: python3 -c "
               "'import secrets; print(secrets.token_urlsafe(32))'")
    else:
        r.ok("console on at /console (admin_token set)")


def main(config_path: str | None = None) -> int:
    report = run(config_path, dict(os.environ))
    report.print()
    return 1 if report.failed else 0
