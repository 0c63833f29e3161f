"""scripts/bench: mxsend vs Postfix on one workload, one sink, one machine, one run.

Run through scripts/bench (it makes the venv and installs Postfix); see --help and
docs/performance.md. Writes bench-out/bench-<time>.json and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_lib import deferred_side, delivery_side, listener_side, mxsend_side, postfix_side
from bench_lib.dnsserver import DnsServer
from bench_lib.sink import sink_hosts
from bench_lib.workload import DOMAINS, make_messages

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("mxsend", "postfix", "latency", "deferred", "listener")
DEFAULT_PARTS = ("mxsend", "postfix", "latency", "deferred")  # --listener adds its part
ROUTINGS = ("per-domain", "one-hop")
MXSEND_MODES = ("delivery", "from-new")


def _cpu_kinds(r: dict[str, Any]) -> str:
    """The rep line's tail, `; CPU s: mxsend 22.6, lua worker 2.3`, where the run split
    its CPU by kind of process (procstat.Window); empty where it did not."""
    kinds = r.get("cpu_s_by_kind")
    if not kinds:
        return ""
    top = sorted(kinds.items(), key=lambda item: -item[1])[:6]
    return "; CPU s: " + ", ".join(f"{kind} {cpu:.1f}" for kind, cpu in top)


def _processes(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number or "auto", got {text!r}') from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark mxsend against Postfix on loopback (docs/performance.md).")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: N=500, no Postfix, 20 latency probes, 1000 deferred")
    ap.add_argument("-n", "--messages", type=int, default=None,
                    help="messages for the throughput runs (default 20000)")
    ap.add_argument("--parts", default=None,
                    help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    ap.add_argument("--no-postfix", action="store_true", help="skip the Postfix side")
    ap.add_argument("--reps", type=int, default=1,
                    help="throughput repetitions, mxsend and Postfix interleaved")
    ap.add_argument("--latency-messages", type=int, default=None,
                    help="messages for the idle-daemon latency test (default 200)")
    ap.add_argument("--deferred", type=int, default=None,
                    help="deferred messages parked for the big-queue test (default 100000)")
    ap.add_argument("--probes", type=int, default=20,
                    help="new messages timed on the daemon with the big deferred queue")
    ap.add_argument("--processes", type=_processes, default="auto",
                    help='mxsend\'s queue.processes for the throughput part: a number or '
                         '"auto" (the default, as mxsend ships: one per core, at most 4)')
    ap.add_argument("--routing", choices=(*ROUTINGS, "both"), default="per-domain",
                    help="per-domain (the default): each recipient domain its own next hop "
                         "and sink address (127.0.0.2-5), for Postfix (transport map) and "
                         "mxsend (MX records) alike; one-hop: every domain to one sink, "
                         "where Postfix merges a message's domains into one transaction; "
                         "both: each rep runs both, reported apart")
    ap.add_argument("--mxsend-mode", choices=(*MXSEND_MODES, "both"), default="both",
                    help="delivery: the delivery phase alone, from a queue of parked "
                         "messages made due with the daemons running, at log.level info: "
                         "the work Postfix's delivery mode times; from-new: `run --once` "
                         "from new/ (start-up and acceptance too, at log.level warning), "
                         "the figure of sessions 1-5; both (the default): each rep runs "
                         "both, reported apart, each against the same Postfix runs")
    ap.add_argument("--one-hop", action="store_const", const="one-hop", dest="routing",
                    help="the same as --routing one-hop")
    ap.add_argument("--mta-sts", choices=("on", "off"), default="on",
                    help="mxsend's tls.mta_sts: on is the shipped default and the plain "
                         "figure (no policy is published: one cached TXT lookup per "
                         "domain); off prices it")
    ap.add_argument("--shape", action="store_true",
                    help="one [[shape]] over the sink hosts, counted in a redis-server the "
                         "harness starts ([cluster] redis); needs the shaping feature")
    ap.add_argument("--listener", action="store_true",
                    help="add the listener part: smtp-source into mxsend's [listen], then "
                         "delivery (messages/s end to end)")
    ap.add_argument("--parked-spool", type=Path, default=None,
                    help="the deferred part's spool: parked there if missing, reused if a "
                         "previous run parked the same count (kept after the run)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="deferred part: skip the retry sweep of the whole queue")
    ap.add_argument("--same-domain", action="store_true",
                    help="both recipients of a message in one domain (one transaction each)")
    ap.add_argument("--dkim", choices=tuple(mxsend_side.DKIM_MODES), default=None,
                    help="mxsend signs every message with DKIM: one RSA-2048 key, or "
                         "RSA-2048 + Ed25519 (a dual signature); default: unsigned")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory (default bench-out/work-<time>; removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound for every wait, s")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out", help="where results go")
    args = ap.parse_args(argv)
    parts = set(DEFAULT_PARTS if args.parts is None else args.parts.split(","))
    if args.listener:
        parts.add("listener")
    unknown = parts - set(PARTS)
    if unknown:
        ap.error(f"--parts: unknown {', '.join(sorted(unknown))} (choose from {PARTS})")
    if args.quick:
        args.messages = args.messages or 500
        args.latency_messages = args.latency_messages or 20
        args.deferred = args.deferred or 1000
        if args.parts is None:
            parts.discard("postfix")
    if args.no_postfix:
        parts.discard("postfix")
    args.messages = args.messages or 20000
    args.latency_messages = args.latency_messages or 200
    args.deferred = args.deferred if args.deferred is not None else 100000
    args.parts = [p for p in PARTS if p in parts]
    args.routings = list(ROUTINGS) if args.routing == "both" else [args.routing]
    args.mxsend_modes = list(MXSEND_MODES) if args.mxsend_mode == "both" \
        else [args.mxsend_mode]
    if min(args.messages, args.latency_messages, args.reps, args.probes) < 1:
        ap.error("counts must be at least 1")
    return args


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    with contextlib.suppress(OSError, IndexError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "mxsend_commit": git,
            "loadavg_at_start": os.getloadavg()}


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _throughput_table(mx_runs: list[dict[str, Any]], pf_runs: list[dict[str, Any]]
                      ) -> list[str]:
    def med(runs: list[dict[str, Any]], key: str) -> float | None:
        return median([r[key] for r in runs if r.get(key) is not None])

    rows = [("messages/s", "msgs_per_s", ".0f"), ("CPU ms/message", "cpu_ms_per_msg", ".2f"),
            ("peak memory MB", "peak_pss_mb", ".1f"), ("wall s", "wall_s", ".2f")]
    lines = [f"{'':18}{'mxsend':>12}{'Postfix':>12}{'mxsend/Postfix':>16}"]
    for label, key, spec in rows:
        a, b = med(mx_runs, key), med(pf_runs, key)
        lines.append(f"{label:18}{fmt(a, spec):>12}{fmt(b, spec):>12}"
                     f"{fmt(ratio(a, b), '.2f'):>16}")
    return lines


def _spread(stats: dict[str, Any]) -> str:
    """A latency summary's p50, p99 and max, as the report prints them."""
    return (f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, "
            f"max {stats['max_ms']:.1f} ms")


MODE_TITLES = {
    "delivery": "delivery phase (equal work: Postfix's delivery mode)",
    "from-new": "from new/ (start-up and acceptance timed too: more work than Postfix's)",
}


def summarize(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    mx_all = results.get("mxsend", [])
    pf_all = results.get("postfix", [])
    for routing in results.get("routings", ["per-domain"]):
        routed = [r for r in mx_all if r.get("routing", routing) == routing]
        pf_runs = [r for r in pf_all if r.get("routing", routing) == routing]
        if not (routed or pf_runs):
            continue
        modes = sorted({r.get("mode", "from-new") for r in routed}) or ["from-new"]
        for mode in modes:
            mx_runs = [r for r in routed if r.get("mode", "from-new") == mode]
            lines.append(f"routing {routing}, mxsend {MODE_TITLES[mode]}:")
            lines += _throughput_table(mx_runs, pf_runs)
        lines.append("  (memory: peak PSS sum over each side's processes, sampled every "
                     "0.5 s, as in the baseline; mxsend's own peak RSS is in the JSON)")
        for name, runs in (("mxsend", routed), ("Postfix", pf_runs)):
            for r in runs:
                want = r.get("expected_transactions", r.get("n"))
                mode = f" ({r.get('mode', 'from-new')})" if name == "mxsend" else ""
                lines.append(f"  {name}{mode}: sink counted {r.get('sink_counted')} of {want} "
                             f"in {r.get('sink_sessions')} sessions; "
                             f"{'OK' if r.get('ok') else 'NOT OK'}")
    lat = results.get("latency")
    if lat:
        lines.append(f"latency, idle daemon ({lat['count']} messages): {_spread(lat)}, "
                     f"{lat['over_5s']} over 5 s; "
                     f"start to READY {lat['start_to_ready_s']:.2f} s, "
                     f"largest RSS {lat['rss_mb']:.0f} MB, PSS sum {lat['pss_sum_mb']:.0f} "
                     f"over {lat['nproc']} processes; "
                     f"{'OK' if lat['ok'] else 'NOT OK'}")
    big = results.get("deferred")
    if big and "probe_latency" in big:
        probe = big["probe_latency"]
        lines.append(f"{big['deferred']} deferred: start to READY {big['start_to_ready_s']:.2f} s "
                     f"({big['cpu_to_ready_s']:.2f} s CPU, all processes), PSS sum at READY "
                     f"{big['pss_sum_at_ready_mb']:.0f} MB over {big['nproc_at_ready']} "
                     f"processes, peak {big['peak_pss_sum_mb']:.0f} MB; largest RSS at READY "
                     f"{big['rss_at_ready_mb']:.0f} MB; {big['cpu_total_s']:.2f} s CPU in all")
        lines.append(f"  new message {_spread(probe)} over {probe['count']}; queue stats "
                     f"{big['queue_stats']['wall_s']:.2f} s, queue list "
                     f"{big['queue_list']['wall_s']:.2f} s ({big['queue_list']['lines']} lines)")
        during = big.get("sweep_probe_latency")
        if during:
            sweep = big["sweep"]
            lines.append(f"  retry sweep (all {sweep['made_due']} made due in "
                         f"{sweep['wall_s']:.2f} s): new message {_spread(during)} while "
                         "the daemons list the queue")
            busy = big.get("sweep_attempting_probe_latency")
            if busy:
                lines.append(f"    and once they attempt it ({sweep['attempts_began_s']:.1f} s "
                             f"after): {_spread(busy)}; {sweep['tarpit_sessions']} "
                             "tarpit sessions in all")
        lines.append(f"  {'OK' if big['ok'] else 'NOT OK'}")
    lis = results.get("listener")
    if lis and "msgs_per_s" in lis:
        lines.append(f"listener ({lis['n']} messages, smtp-source, {lis['sessions']} sessions): "
                     f"{lis['msgs_per_s']:.0f} msg/s end to end, {lis['cpu_ms_per_msg']:.2f} "
                     f"ms CPU/msg (mxsend), peak PSS {lis['peak_pss_mb']:.0f} MB; "
                     f"{'OK' if lis['ok'] else 'NOT OK'}")
    return lines


def run_throughput(args: argparse.Namespace, msgs: list[Any], workdir: Path, routing: str,
                   nameserver: str, hosts: list[str], extra: str, results: dict[str, Any],
                   failures: list[str]) -> None:
    """The interleaved reps of the throughput parts for one routing."""
    for rep in range(args.reps):
        tag = f"{routing} rep {rep}"
        for mode in args.mxsend_modes if "mxsend" in args.parts else []:
            rundir = workdir / f"mxsend-{mode}-{routing}-{rep}"
            rundir.mkdir()
            if mode == "delivery":
                dkim = mxsend_side.dkim_keys(rundir, args.dkim) if args.dkim else None
                r = delivery_side.run_delivery(msgs, rundir, nameserver, args.timeout,
                                               processes=args.processes, sink_hosts=hosts,
                                               mta_sts=args.mta_sts == "on", extra_toml=extra,
                                               dkim=dkim)
            else:
                r = mxsend_side.run_once(msgs, rundir, nameserver, args.timeout,
                                         processes=args.processes, sink_hosts=hosts,
                                         mta_sts=args.mta_sts == "on", extra_toml=extra,
                                         dkim=args.dkim)
                r["mode"] = mode
            r["routing"] = routing
            results.setdefault("mxsend", []).append(r)
            print(f"mxsend  {tag} ({mode}): {r['msgs_per_s']:.0f} msg/s, "
                  f"{r['cpu_ms_per_msg']:.2f} ms CPU/msg, peak PSS "
                  f"{r['peak_pss_mb']:.0f} MB, sink {r['sink_counted']}/"
                  f"{r['expected_transactions']}, left {r['leftovers'] or 'nothing'}"
                  f"{_cpu_kinds(r)}", flush=True)
            if not r["ok"]:
                failures.append(f"mxsend {tag} ({mode}): log {r['log']}")
        if "postfix" in args.parts:
            rundir = workdir / f"postfix-{routing}-{rep}"
            rundir.mkdir()
            r = postfix_side.run_delivery(msgs, rundir, args.timeout, sink_hosts=hosts)
            r["routing"] = routing
            results.setdefault("postfix", []).append(r)
            print(f"Postfix {tag}: {r['msgs_per_s']:.0f} msg/s, "
                  f"{r['cpu_ms_per_msg']:.2f} ms CPU/msg, peak PSS "
                  f"{r['peak_pss_mb']:.0f} MB (RSS sum {r['peak_rss_mb']:.0f}), "
                  f"sink {r['sink_counted']}/{r['expected_transactions']}, "
                  f"log {r['log']}{_cpu_kinds(r)}", flush=True)
            if not r["ok"]:
                failures.append(f"Postfix {tag}: {r['log']}")


def run_others(args: argparse.Namespace, workdir: Path, nameserver: str, hosts: list[str],
               extra: str, results: dict[str, Any], failures: list[str]) -> None:
    """Latency, the big deferred queue and the listener, with the first routing."""
    if "latency" in args.parts:
        lat_msgs = make_messages(args.latency_messages, seed=7, same_domain=args.same_domain)
        rundir = workdir / "latency"
        rundir.mkdir()
        r = mxsend_side.run_latency(lat_msgs, rundir, nameserver, args.timeout,
                                    sink_hosts=hosts)
        results["latency"] = r
        if not r["ok"]:
            failures.append(f"latency: {r['leftovers']} {r['log']}")
    if "deferred" in args.parts:
        probes = make_messages(args.probes, seed=13, start=10**7,
                               same_domain=args.same_domain)
        rundir = workdir / "deferred"
        rundir.mkdir()
        print(f"deferred: {args.deferred} parked messages...", flush=True)
        parked = args.parked_spool.resolve() if args.parked_spool else None
        r = deferred_side.run_deferred(args.deferred, probes, rundir, nameserver,
                                       args.timeout, sink_hosts=hosts, parked_spool=parked,
                                       sweep=not args.no_sweep, processes=args.processes)
        results["deferred"] = r
        if not r["ok"]:
            failures.append(f"deferred: {r['leftovers']} {r['log']}")
    if "listener" in args.parts:
        rundir = workdir / "listener"
        rundir.mkdir()
        r = listener_side.run_listener(args.messages, rundir, nameserver, args.timeout,
                                       sink_hosts=hosts, mta_sts=args.mta_sts == "on",
                                       extra_toml=extra)
        results["listener"] = r
        print(f"listener: {r['msgs_per_s']:.0f} msg/s end to end, "
              f"{r['cpu_ms_per_msg']:.2f} ms CPU/msg, peak PSS {r['peak_pss_mb']:.0f} MB, "
              f"sink {r['sink_counted']}/{r['n']}", flush=True)
        if not r["ok"]:
            failures.append(f"listener: {r['leftovers']} {r['source_errors']} {r['log']}")


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops what it started
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = (args.workdir or args.out / f"work-{stamp}").resolve()
    workdir.mkdir(parents=True, exist_ok=False)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["scripts/bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "parts": args.parts, "n": args.messages,
        "same_domain": args.same_domain, "processes": args.processes, "dkim": args.dkim,
        "routings": args.routings, "mta_sts": args.mta_sts, "shape": args.shape,
        "mxsend_modes": args.mxsend_modes,
    }
    failures: list[str] = []
    out_file = args.out / f"bench-{stamp}.json"
    msgs = make_messages(args.messages, seed=args.messages, same_domain=args.same_domain)
    print(f"scripts/bench: {', '.join(args.parts)}; N={args.messages}; work in {workdir}",
          flush=True)
    try:
        with contextlib.ExitStack() as stack:
            extra = ""
            if args.shape:
                from tests.fixtures.redis_server import RedisServer

                redis = RedisServer(workdir)
                redis.start()
                stack.callback(redis.stop)
                results["redis"] = redis.url
            first: tuple[Any, list[str]] | None = None
            for routing in args.routings:
                hosts = sink_hosts(routing == "per-domain", len(DOMAINS))
                dns = stack.enter_context(DnsServer(
                    ROOT, workdir, addresses=hosts if routing == "per-domain" else None,
                    name=f"zone-{routing}"))
                first = first or (dns, hosts)
                if args.shape:
                    extra = listener_side.shape_toml(results["redis"])
                run_throughput(args, msgs, workdir, routing, dns.nameserver, hosts, extra,
                               results, failures)
            assert first is not None
            dns, hosts = first
            run_others(args, workdir, dns.nameserver, hosts, extra, results, failures)
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
        results["error"] = failures[-1]
    except BaseException:
        failures.append("interrupted")
        results["error"] = "interrupted"
        print(f"scripts/bench: interrupted; partial results in {out_file}", file=sys.stderr)
        raise
    finally:
        results["failures"] = failures
        out_file.write_text(json.dumps(results, indent=1) + "\n")
        if not args.keep and not failures:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    for line in summarize(results):
        print(line)
    print(f"results: {out_file}" + (f"; work files kept in {workdir}"
                                    if args.keep or failures else ""))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
