"""Shared helpers: latency histogram, /proc readers, request signing, payload marker."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import resource
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------
# Latency histogram: log-linear buckets (64 sub-buckets per power of two, about
# 1.5 % relative error), cheap to update in the hot path and mergeable across
# processes as plain lists of ints.
SUB_BITS = 6
N_BUCKETS = 64 << SUB_BITS


def hist_new() -> list[int]:
    return [0] * N_BUCKETS


def hist_index(v: int) -> int:
    # Inlined in the subscriber hot path; kept here as the reference definition.
    if v < 0:
        v = 0
    s = v.bit_length() - (SUB_BITS + 1)
    if s <= 0:
        return v
    return (s << SUB_BITS) + (v >> s)


def hist_value(idx: int) -> float:
    """Midpoint of a bucket, in the histogram's unit."""
    if idx < (2 << SUB_BITS):
        return float(idx)
    s = (idx >> SUB_BITS) - 1
    m = idx - (s << SUB_BITS)
    return float((m << s) + (1 << s) / 2)


def hist_merge(dst: list[int], src: Iterable[int]) -> None:
    for i, c in enumerate(src):
        if c:
            dst[i] += c


def hist_count(h: list[int]) -> int:
    return sum(h)


def hist_percentiles(h: list[int], ps: Iterable[float]) -> dict[str, float | None]:
    """Percentiles (ps in 0..100) plus max; None when the histogram is empty."""
    total = sum(h)
    out: dict[str, float | None] = {}
    ps = list(ps)
    if total == 0:
        for p in ps:
            out[pname(p)] = None
        out["max"] = None
        return out
    targets = sorted((max(1, int(p / 100.0 * total + 0.999999)), p) for p in ps)
    acc = 0
    ti = 0
    for i, c in enumerate(h):
        if not c:
            continue
        acc += c
        while ti < len(targets) and acc >= targets[ti][0]:
            out[pname(targets[ti][1])] = hist_value(i)
            ti += 1
    last = max(i for i, c in enumerate(h) if c)
    out["max"] = hist_value(last)
    return out


def pname(p: float) -> str:
    return f"p{p:g}"


def hist_from_values(values: Iterable[int]) -> list[int]:
    h = hist_new()
    for v in values:
        h[min(hist_index(v), N_BUCKETS - 1)] += 1
    return h


# ---------------------------------------------------------------------------
# Payload marker. The send time (monotonic ns, system-wide clock so it is
# comparable across processes) and the sequence number are fixed-width digits
# inside a JSON string value, so they survive any re-encoding of "data" and can
# be sliced out with one bytes.find() instead of a JSON decode.
MARK = b"~T"
T_DIGITS = 19
S_DIGITS = 12
# offsets relative to the position of MARK
T_OFF = 2
S_OFF = 2 + T_DIGITS + 2  # after "~S"
BENCH_EVENT = "bench-event"


def marker(t_ns: int, seq: int) -> str:
    return f"~T{t_ns:019d}~S{seq:012d}~"


# ---------------------------------------------------------------------------
# Pusher HTTP API signing.
def pusher_signed_path(
    app_id: str, key: str, secret: str, body: bytes, ts: int | None = None
) -> str:
    path = f"/apps/{app_id}/events"
    md5 = hashlib.md5(body).hexdigest()
    ts = int(time.time()) if ts is None else ts
    # Keys are already in sorted order: auth_key < auth_timestamp < auth_version < body_md5.
    qs = f"auth_key={key}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}"
    sig = hmac.new(secret.encode(), f"POST\n{path}\n{qs}".encode(), hashlib.sha256).hexdigest()
    return f"{path}?{qs}&auth_signature={sig}"


def fastrelay_signature(secret: str, ts: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


# ---------------------------------------------------------------------------
# /proc readers for the server's process tree.
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(d))
    return kids


def pid_tree(pid: int) -> list[int]:
    """pid and all its live descendants."""
    kids = _children_map()
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(kids.get(p, []))
    return out


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    rest = raw[raw.rfind(b")") + 2 :].split()
    # fields 14/15 (utime, stime) are at index 11/12 after the state field
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def _tree_sum(pid: int, read: Any) -> Any:
    """read() summed over a process and its descendants; None when none could be read."""
    total, seen = 0, False
    for p in pid_tree(pid):
        try:
            total += read(p)
            seen = True
        except OSError:
            pass
    return total if seen else None


def tree_cpu_s(pid: int) -> float | None:
    return _tree_sum(pid, proc_cpu_s)


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> int | None:
    return _tree_sum(pid, proc_rss_kib)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def system_cpu() -> tuple[float, float, float]:
    """(busy seconds, total seconds, irq+softirq seconds) summed over all CPUs, /proc/stat.

    irq/softirq time is not charged to any process's utime/stime: on loopback most of the
    TCP receive path (of both the server's and the generator's sockets) runs there, so it
    is reported on its own instead of being mistaken for other load on the machine."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts[:8]]
    idle = vals[3] + vals[4]
    total = sum(vals)
    return (total - idle) / CLK_TCK, total / CLK_TCK, (vals[5] + vals[6]) / CLK_TCK


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# ---------------------------------------------------------------------------
@dataclass
class Endpoint:
    """Where the server is: WebSocket/API base URL and the (maybe separate) publish URL."""

    url: str
    publish_url: str
    app_id: str
    key: str
    secret: str
    sub_urls: tuple[str, ...] = ()  # a cluster: subscribers spread over these nodes

    @property
    def ws_url(self) -> str:
        return self.ws_urls[0]

    @property
    def ws_urls(self) -> list[str]:
        out = []
        for base in self.sub_urls or (self.url,):
            u = urlsplit(base)
            scheme = "wss" if u.scheme in ("https", "wss") else "ws"
            out.append(f"{scheme}://{u.netloc}/app/{self.key}?protocol=7&client=bench&version=1.0")
        return out

    @property
    def publish_hostport(self) -> tuple[str, int]:
        u = urlsplit(self.publish_url)
        if u.scheme in ("https", "wss"):
            raise SystemExit("bench: https publish URLs are not supported by the built-in client")
        return u.hostname or "127.0.0.1", u.port or 80


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, udp: bool = False) -> bool:
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
