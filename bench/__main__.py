"""python -m bench <fanout|connections|intake|compare> [options]  (see bench/README.md)"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import signal
import sys
from typing import Any

import uvloop

from bench import report, targets
from bench.common import Endpoint
from bench.runner import BenchError, log, run_connections, run_publish

SCENARIOS = ("fanout", "connections", "intake")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--url", default="http://127.0.0.1:6001", help="WebSocket + HTTP API base URL")
    g.add_argument("--publish-url", default=None, help="HTTP API base for triggers (default --url)")
    g.add_argument("--sub-urls", default=None,
                   help="comma-separated base URLs of cluster nodes; subscribers are spread over "
                        "them round-robin (default: --url)")
    g.add_argument("--app-id", default="app1")
    g.add_argument("--key", default="key1")
    g.add_argument("--secret", default="secret1")
    g.add_argument("--pid", type=int, default=None,
                   help="server pid: CPU/RSS of it and its descendants (omit: no server figures)")
    g = p.add_argument_group("generator")
    g.add_argument("--procs", type=int, default=2, help="subscriber processes")
    g.add_argument("--concurrency", type=int, default=200, help="connection attempts in flight")
    g.add_argument("--connect-timeout", type=float, default=15.0)
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, help="results JSON (default bench/results/...)")
    g.add_argument("--png", default=None, help="chart PNG (default bench/results/...)")
    g.add_argument("--no-save", action="store_true", help="write neither JSON nor PNG")
    g.add_argument("--label", default=None, help="name of the target in the output")


def _scenario_opts(
    g: argparse._ArgumentGroup, publish: bool = False, hold: bool = False, helps: bool = True
) -> None:
    """Scenario options shared by the subcommands and `compare` (which lists them without
    help text): publish = fanout/intake options, hold = connections' --hold."""

    def add(*names: str, help: str | None = None, **kw: Any) -> None:
        g.add_argument(*names, help=help if helps else None, **kw)

    if publish:
        add("--rate", type=float, default=None,
            help="deliveries/s, open loop (fanout); publish rate = rate / subs per channel")
        add("--saturate", action="store_true", help="publish back-to-back (default)")
        add("--inflight", type=int, default=4,
            help="saturate: connections with one request in flight each")
        add("--http-conns", type=int, default=16, help="rate mode: publisher connections")
        add("-d", "--duration", type=float, default=10.0, help="measured seconds")
        add("--warmup", type=float, default=2.0)
        add("--drain", type=float, default=5.0, help="max seconds to wait for stragglers")
        add("--payload", type=int, default=64, help="padding bytes in each event's data")
        add("--endpoint", choices=("pusher", "api-events"), default="pusher",
            help="pusher: POST /apps/{id}/events; api-events: fastrelay POST /api/events")
    if hold:
        add("--hold", type=float, default=3.0, help="idle seconds before reading RSS")


def _load(p: argparse.ArgumentParser, scenario: str) -> None:
    g = p.add_argument_group(scenario)
    if scenario == "fanout":
        g.add_argument("-c", "--connections", type=int, default=1000, help="subscribers")
        g.add_argument("-k", "--channels", type=int, default=1, help="channels (1, 10, 100...)")
    else:
        g.add_argument("-c", "--connections", "--subscribers", type=int, default=0,
                       help="subscribers (default 0)")
        g.add_argument("-k", "--channels", type=int, default=1)
    _scenario_opts(g, publish=True)


def _conns(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connections")
    g.add_argument("-n", "--connections", type=int, default=10000)
    _scenario_opts(g, hold=True)
    g.add_argument("--source-ips", type=int, default=0,
                   help="spread connections over this many loopback source addresses "
                        "(127.0.0.2...): one address has ~28k ports; needed past that")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("fanout", "C subscribers on K channels, signed HTTP triggers, fan-out latency/CPU"),
        ("intake", "HTTP trigger requests/s and latency at saturation"),
        ("connections", "N idle connections: connections/s and server RSS per connection"),
    ):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        _conns(p) if name == "connections" else _load(p, name)
    p = sub.add_parser("compare", help="start each target in turn, same scenario, side by side")
    p.add_argument("--targets", default="pyfloor,uwsfloor,soketi",
                   help=f"comma list of {', '.join(targets.ALL_TARGETS)}; fastrelay@DIR: "
                   "the checkout in DIR (built in place), to compare versions")
    p.add_argument("--scenario", choices=SCENARIOS, default="fanout")
    p.add_argument("--baseline", default=None, help="ratio denominator (default first target)")
    p.add_argument("--repeat", type=int, default=1, help="runs per target, interleaved")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--pin", default=None, metavar="CPUS",
                   help="pin each server to these CPUs (e.g. 0) and the bench to the others")
    _common(p)
    # compare takes the union of scenario options; -n/--connections is shared
    g = p.add_argument_group("scenario")
    g.add_argument("-c", "-n", "--connections", type=int, default=None,
                   help="subscribers / idle connections (scenario default)")
    g.add_argument("-k", "--channels", type=int, default=1)
    _scenario_opts(g, publish=True, hold=True, helps=False)
    return ap


def _check(o: argparse.Namespace) -> None:
    if getattr(o, "saturate", False) and o.rate is not None:
        raise SystemExit("bench: --rate and --saturate are exclusive")


async def run_one(o: argparse.Namespace, ep: Endpoint, pid: int | None) -> dict[str, Any]:
    if o.scenario == "connections":
        budget = o.connect_timeout + o.connections / 100 + o.hold + 120
        coro = run_connections(o, ep, pid)
    else:
        budget = o.warmup + o.duration + o.drain + o.connect_timeout + o.connections / 100 + 120
        coro = run_publish(o, ep, pid)
    try:
        res = await asyncio.wait_for(coro, budget)
    except TimeoutError as e:
        raise BenchError(f"run exceeded its {budget:.0f}s budget") from e
    res["env"] = report.env_info()
    return res


def _outputs(o: argparse.Namespace, name: str) -> tuple[str | None, str | None]:
    if o.no_save:
        return o.json, o.png
    return o.json or report.default_path(name, "json"), o.png or report.default_path(name, "png")


async def cmd_single(o: argparse.Namespace) -> int:
    ep = Endpoint(o.url, o.publish_url or o.url, o.app_id, o.key, o.secret,
                  tuple(u for u in (o.sub_urls or "").split(",") if u))
    res = await run_one(o, ep, o.pid)
    print(report.table(res), flush=True)
    jpath, ppath = _outputs(o, o.scenario)
    if jpath:
        report.write_json(jpath, res)
        log(f"wrote {jpath}")
    if ppath:
        report.write_png(ppath, [(res["target"], res)], f"{o.scenario} — {res['target']}")
        log(f"wrote {ppath}")
    return 0


async def cmd_compare(o: argparse.Namespace) -> int:
    names = [t.strip() for t in o.targets.split(",") if t.strip()]
    for n in names:
        if not targets.known(n):
            raise SystemExit(f"bench: unknown target {n!r}")
    baseline = o.baseline or names[0]
    if o.pin:
        cpus = {int(c) for c in o.pin.split(",")}
        rest = set(range(os.cpu_count() or 1)) - cpus
        if not rest:
            raise SystemExit("bench: --pin leaves no CPU for the generator")
        targets.SERVER_CPUS = cpus
        os.sched_setaffinity(0, rest)  # subscriber processes inherit it
        log(f"servers pinned to CPU {sorted(cpus)}, bench to CPU {sorted(rest)}")
    o.connections = (
        o.connections
        if o.connections is not None
        else {"fanout": 1000, "intake": 0, "connections": 10000}[o.scenario]
    )
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    failures: dict[str, list[str]] = {n: [] for n in names}
    for rep in range(o.repeat):
        # Rotate the order each round so no target always runs first (or right after another).
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            why = targets.available(name)
            if why:
                if rep == 0:
                    log(f"{name}: skipped ({why})")
                failures[name].append(why)
                continue
            log(f"[{rep + 1}/{o.repeat}] starting {name}")
            try:
                r = await targets.start(name, o.start_timeout)
            except (targets.TargetError, OSError) as e:
                log(f"{name}: could not start: {e}")
                failures[name].append(f"start: {e}")
                continue
            try:
                oo = copy.copy(o)
                oo.scenario = o.scenario
                oo.label = name
                res = await run_one(oo, r.endpoint, r.pid)
                res["run"] = rep
                res["server_log"] = r.log_path
                runs[name].append(res)
                print(report.table(res), flush=True)
            except BenchError as e:
                log(f"{name}: run failed: {e}")
                failures[name].append(str(e))
            finally:
                await targets.stop(r)
                await asyncio.sleep(1.0)  # let sockets in TIME_WAIT and the CPU settle
    done = {n: v for n, v in runs.items() if v}
    if not done:
        log("no target produced results")
        return 1
    agg = {n: report.aggregate(v, o.scenario) for n, v in done.items()}
    if baseline not in done:
        baseline = next(iter(done))
    print(f"\n== compare: {o.scenario} ==", flush=True)
    print(report.compare_table(agg, o.scenario, baseline, o.repeat), flush=True)
    for n, f in failures.items():
        if f:
            print(f"  {n}: {len(f)} failed/skipped run(s): {f[0]}")
    jpath, ppath = _outputs(o, f"compare-{o.scenario}")
    if jpath:
        report.write_json(
            jpath,
            {"scenario": o.scenario, "baseline": baseline, "aggregate": agg, "runs": runs,
             "failures": failures, "options": vars(o)},
        )
        log(f"wrote {jpath}")
    if ppath:
        report.write_png(ppath, [(n, v[0]) for n, v in done.items()], f"compare: {o.scenario}")
        log(f"wrote {ppath}")
    return 0


async def amain(o: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM/SIGINT cancel the run so every finally block (servers, subscribers) still runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        if o.command == "compare":
            return await cmd_compare(o)
        return await cmd_single(o)
    except BenchError as e:
        log(f"error: {e}")
        return 2
    except asyncio.CancelledError:
        log("interrupted")
        return 130


def main() -> None:
    o = build_parser().parse_args()
    if o.command != "compare":
        o.scenario = o.command
    _check(o)
    sys.exit(uvloop.run(amain(o)))


if __name__ == "__main__":
    main()
