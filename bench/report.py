"""Human tables, JSON files and PNG charts for results."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import hist_percentiles, pname

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (label, dotted key, decimals)
METRICS: dict[str, list[tuple[str, str, int]]] = {
    "fanout": [
        ("subscribed connections", "subscribe.subscribed", 0),
        ("published events/s", "published_per_s", 1),
        ("deliveries/s", "deliveries_per_s", 0),
        ("loss %", "loss_pct", 3),
        ("latency p50 ms", "latency_ms.p50", 2),
        ("latency p90 ms", "latency_ms.p90", 2),
        ("latency p99 ms", "latency_ms.p99", 2),
        ("latency p99.9 ms", "latency_ms.p99.9", 2),
        ("latency max ms", "latency_ms.max", 2),
        ("first delivery p50 ms", "first_delivery_latency_ms.p50", 2),
        ("first delivery p99 ms", "first_delivery_latency_ms.p99", 2),
        ("trigger answer p50 ms", "trigger_latency_ms.p50", 2),
        ("trigger answer p99 ms", "trigger_latency_ms.p99", 2),
        ("server CPU-s /100k deliveries", "server_cpu_per_100k_deliveries", 3),
        ("generator CPU-s /100k deliv.", "generator_cpu_per_100k_deliveries", 3),
        ("server CPU-s in window", "cpu.server_cpu_s", 2),
        ("machine busy %", "cpu.machine_busy_pct", 1),
        ("kernel softirq (cores)", "cpu.softirq_cores", 2),
        ("other load (cores)", "cpu.other_load_cores", 2),
        ("rate max lag s", "rate_max_lag_s", 3),
        ("HTTP errors", "_http_errors", 0),
        ("HTTP connections opened", "http_connects", 0),
        ("unexpected disconnects", "disconnects", 0),
        ("verify ok / fail", "_verify", 0),
    ],
    "intake": [
        ("requests/s", "requests_per_s", 0),
        ("trigger answer p50 ms", "trigger_latency_ms.p50", 3),
        ("trigger answer p99 ms", "trigger_latency_ms.p99", 3),
        ("server CPU us/request", "server_cpu_per_request_us", 2),
        ("generator CPU us/request", "generator_cpu_per_request_us", 2),
        ("subscribed connections", "subscribe.subscribed", 0),
        ("deliveries/s", "deliveries_per_s", 0),
        ("loss %", "loss_pct", 3),
        ("latency p50 ms", "latency_ms.p50", 2),
        ("latency p99 ms", "latency_ms.p99", 2),
        ("server CPU-s /100k deliveries", "server_cpu_per_100k_deliveries", 3),
        ("server CPU-s in window", "cpu.server_cpu_s", 2),
        ("machine busy %", "cpu.machine_busy_pct", 1),
        ("kernel softirq (cores)", "cpu.softirq_cores", 2),
        ("other load (cores)", "cpu.other_load_cores", 2),
        ("HTTP errors", "_http_errors", 0),
        ("HTTP connections opened", "http_connects", 0),
    ],
    "connections": [
        ("connections established", "established", 0),
        ("all established", "all_established", 0),
        ("alive after hold", "alive_after_hold", 0),
        ("connections/s (opening)", "connections_per_s", 0),
        ("server RSS before MiB", "_rss0", 1),
        ("server RSS after MiB", "_rss1", 1),
        ("server RSS per connection KiB", "rss_per_connection_kib", 2),
        ("server CPU ms /1k connections", "server_cpu_ms_per_1k_connections", 1),
        ("generator CPU ms /1k conn.", "generator_cpu_ms_per_1k_connections", 1),
        ("machine busy %", "cpu.machine_busy_pct", 1),
        ("unexpected disconnects", "disconnects", 0),
    ],
}


def get(res: dict[str, Any], key: str) -> Any:
    if key == "_http_errors":
        return sum(res.get("http_errors", {}).values()) if "http_errors" in res else None
    if key == "_verify":
        v = res.get("verify")
        return None if v is None else f"{v['ok']} / {v['fail']}"
    if key in ("_rss0", "_rss1"):
        v = res.get("server_rss_before_kib" if key == "_rss0" else "server_rss_after_kib")
        return None if v is None else v / 1024
    cur: Any = res
    # keys like "latency_ms.p99.9": split only at the first dot
    head, _, tail = key.partition(".")
    cur = cur.get(head) if isinstance(cur, dict) else None
    if tail:
        if isinstance(cur, dict) and tail in cur:
            return cur[tail]
        return get(cur, tail) if isinstance(cur, dict) else None
    return cur


def fmt(v: Any, dec: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int | float):
        return f"{v:,.{dec}f}"
    return str(v)


def table(res: dict[str, Any]) -> str:
    rows = METRICS.get(res["scenario"], [])
    lines = [f"== {res['scenario']} against {res['target']} =="]
    p = res.get("params", {})
    lines.append("   " + ", ".join(f"{k}={v}" for k, v in p.items() if v is not None))
    w = max(len(r[0]) for r in rows)
    for label, key, dec in rows:
        v = get(res, key)
        if v is None and key.startswith(("subscribe", "deliveries", "latency", "loss")):
            continue
        lines.append(f"  {label:<{w}}  {fmt(v, dec):>14}")
    if res.get("http_errors"):
        lines.append(f"  HTTP errors: {res['http_errors']} {res.get('http_error_samples', [])[:1]}")
    if res.get("client_errors"):
        lines.append(f"  client errors: {res['client_errors']}")
    if res.get("failed"):
        lines.append(f"  connect failures: {res['failed']}")
    return "\n".join(lines)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def aggregate(runs: list[dict[str, Any]], scenario: str) -> dict[str, Any]:
    """Median and spread ((max-min)/median) of every numeric metric over repeated runs."""
    out: dict[str, Any] = {}
    for label, key, _ in METRICS[scenario]:
        vals = [_num(get(r, key)) for r in runs]
        nums = [v for v in vals if v is not None]
        if not nums:
            out[label] = {"median": None, "spread_pct": None, "values": vals}
            continue
        med = statistics.median(nums)
        spread = (max(nums) - min(nums)) / abs(med) * 100 if med else 0.0
        out[label] = {"median": med, "spread_pct": round(spread, 1), "values": vals}
    return out


def compare_table(
    agg: dict[str, dict[str, Any]], scenario: str, baseline: str, repeat: int
) -> str:
    targets = list(agg)
    w = max(len(m[0]) for m in METRICS[scenario])
    colw = 16 if repeat > 1 else 12
    head = f"  {'metric':<{w}}" + "".join(f"{t:>{colw}}" for t in targets)
    ratio_t = [t for t in targets if t != baseline and baseline in agg]
    head += "".join(f"{t + '/' + baseline:>{max(12, len(t) + len(baseline) + 3)}}" for t in ratio_t)
    lines = [head, "  " + "-" * (len(head) - 2)]
    for label, _, dec in METRICS[scenario]:
        cells = []
        any_val = False
        for t in targets:
            m = agg[t].get(label, {})
            med = m.get("median")
            any_val = any_val or med is not None
            c = fmt(med, dec)
            if repeat > 1 and med is not None:
                c += f" ±{m['spread_pct']:.0f}%"
            cells.append(f"{c:>{colw}}")
        if not any_val:
            continue
        rat = []
        b = agg.get(baseline, {}).get(label, {}).get("median")
        for t in ratio_t:
            v = agg[t].get(label, {}).get("median")
            r = f"{v / b:.2f}x" if v is not None and b else "-"
            rat.append(f"{r:>{max(12, len(t) + len(baseline) + 3)}}")
        lines.append(f"  {label:<{w}}" + "".join(cells) + "".join(rat))
    if repeat > 1:
        lines.append(f"  (median of {repeat} interleaved runs; ±: (max-min)/median)")
    return "\n".join(lines)


def default_path(scenario: str, ext: str) -> str:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return str(RESULTS_DIR / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}.{ext}")


def write_json(path: str, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


# ---------------------------------------------------------------------------
PCT_AXIS = [50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99]


def _lat_curve(res: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    h = res.get("latency_hist")
    if not h:
        return None
    from bench.common import N_BUCKETS

    hist = [0] * N_BUCKETS
    for k, v in h.items():
        hist[int(k)] = v
    pc = hist_percentiles(hist, PCT_AXIS)
    xs, ys = [], []
    for p in PCT_AXIS:
        v = pc.get(pname(p))
        if v is not None:
            xs.append(p)
            ys.append(v / 1e6)
    return xs, ys


def write_png(path: str, runs: Sequence[tuple[str, dict[str, Any]]], title: str) -> None:
    """Latency by percentile (left) and throughput over the window (right), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    import math

    any_lat = False
    for name, res in runs:
        c = _lat_curve(res)
        if c:
            any_lat = True
            xs = [-math.log10(1 - p / 100) for p in c[0]]
            ax1.plot(xs, c[1], marker="o", label=name)
    if any_lat:
        ax1.set_xticks([-math.log10(1 - p / 100) for p in PCT_AXIS])
        ax1.set_xticklabels([f"p{p:g}" for p in PCT_AXIS], rotation=45)
        ax1.set_yscale("log")
        ax1.set_ylabel("end-to-end latency (ms)")
        ax1.set_title("latency by percentile")
        ax1.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=8)
    elif runs and runs[0][1].get("scenario") == "connections":
        names = [n for n, _ in runs]
        vals = [r.get("rss_per_connection_kib") or 0 for _, r in runs]
        ax1.bar(names, vals)
        ax1.set_ylabel("server RSS per connection (KiB)")
        ax1.set_title("memory per idle connection")
    else:
        ax1.text(0.5, 0.5, "no deliveries measured", ha="center", transform=ax1.transAxes)
    for name, res in runs:
        s = res.get("series") or {}
        if s.get("t"):
            key = "deliveries_per_s" if any(s.get("deliveries_per_s", [])) else "published_per_s"
            ax2.plot(s["t"], s[key], marker=".", label=f"{name} ({key.replace('_', ' ')})")
        elif res.get("scenario") == "connections":
            ax2.bar([name], [res.get("connections_per_s") or 0])
            ax2.set_ylabel("connections/s while opening")
    ax2.set_xlabel("seconds into the measurement window")
    ax2.set_title("throughput over time")
    ax2.grid(True, alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def env_info() -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ncpu": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
