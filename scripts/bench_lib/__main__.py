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

from bench_lib import mxsend_side, postfix_side
from bench_lib.dnsserver import DnsServer
from bench_lib.workload import make_messages

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("mxsend", "postfix", "latency", "deferred")


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
    parts = set(PARTS if args.parts is None else args.parts.split(","))
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


def summarize(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    mx_runs = results.get("mxsend", [])
    pf_runs = results.get("postfix", [])
    if mx_runs or pf_runs:
        def med(runs: list[dict[str, Any]], key: str) -> float | None:
            return median([r[key] for r in runs if r.get(key) is not None])

        rows = [("messages/s", "msgs_per_s", ".0f"), ("CPU ms/message", "cpu_ms_per_msg", ".2f"),
                ("peak memory MB", None, ".1f"), ("wall s", "wall_s", ".2f")]
        lines.append(f"{'':18}{'mxsend':>12}{'Postfix':>12}{'mxsend/Postfix':>16}")
        for label, key, spec in rows:
            if key is None:  # peak PSS sums of each side's processes, sampled alike
                a, b = med(mx_runs, "peak_pss_mb"), med(pf_runs, "peak_pss_mb")
            else:
                a, b = med(mx_runs, key), med(pf_runs, key)
            lines.append(f"{label:18}{fmt(a, spec):>12}{fmt(b, spec):>12}"
                         f"{fmt(ratio(a, b), '.2f'):>16}")
        lines.append("  (memory: peak PSS sum over each side's processes, sampled every 0.5 s, "
                     "as in the baseline; mxsend's own peak RSS is in the JSON)")
        for name, runs in (("mxsend", mx_runs), ("Postfix", pf_runs)):
            for r in runs:
                want = r.get("expected_transactions", r.get("n"))
                lines.append(f"  {name}: sink counted {r.get('sink_counted')} of {want} "
                             f"in {r.get('sink_sessions')} sessions; "
                             f"{'OK' if r.get('ok') else 'NOT OK'}")
    lat = results.get("latency")
    if lat:
        lines.append(f"latency, idle daemon ({lat['count']} messages): p50 "
                     f"{lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max "
                     f"{lat['max_ms']:.1f} ms, {lat['over_5s']} over 5 s; "
                     f"start to READY {lat['start_to_ready_s']:.2f} s, "
                     f"largest RSS {lat['rss_mb']:.0f} MB, PSS sum {lat['pss_sum_mb']:.0f} "
                     f"over {lat['nproc']} processes; "
                     f"{'OK' if lat['ok'] else 'NOT OK'}")
    big = results.get("deferred")
    if big:
        probe = big["probe_latency"]
        lines.append(f"{big['deferred']} deferred: start to READY {big['start_to_ready_s']:.2f} s "
                     f"({big['cpu_to_ready_s']:.2f} s CPU, all processes), largest RSS at "
                     f"READY {big['rss_at_ready_mb']:.0f} MB, PSS sum "
                     f"{big['pss_sum_at_ready_mb']:.0f} over {big['nproc_at_ready']} processes, "
                     f"largest peak {big['peak_rss_mb']:.0f} MB; "
                     f"{big['cpu_total_s']:.2f} s CPU in all; "
                     f"new message p50 {probe['p50_ms']:.1f} ms, max {probe['max_ms']:.1f} ms "
                     f"over {probe['count']}; {'OK' if big['ok'] else 'NOT OK'}")
    return lines


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
    }
    failures: list[str] = []
    out_file = args.out / f"bench-{stamp}.json"
    msgs = make_messages(args.messages, seed=args.messages, same_domain=args.same_domain)
    print(f"scripts/bench: {', '.join(args.parts)}; N={args.messages}; work in {workdir}",
          flush=True)
    try:
        with DnsServer(ROOT, workdir) as dns:
            for rep in range(args.reps):
                if "mxsend" in args.parts:
                    rundir = workdir / f"mxsend-{rep}"
                    rundir.mkdir()
                    r = mxsend_side.run_once(msgs, rundir, dns.nameserver, args.timeout,
                                             processes=args.processes, dkim=args.dkim)
                    results.setdefault("mxsend", []).append(r)
                    print(f"mxsend  rep {rep}: {r['msgs_per_s']:.0f} msg/s, "
                          f"{r['cpu_ms_per_msg']:.2f} ms CPU/msg, peak PSS "
                          f"{r['peak_pss_mb']:.0f} MB (own RSS {r['peak_rss_mb']:.0f}), "
                          f"sink {r['sink_counted']}/"
                          f"{r['expected_transactions']}, exit {r['exit_code']}, "
                          f"left {r['leftovers'] or 'nothing'}", flush=True)
                    if not r["ok"]:
                        failures.append(f"mxsend rep {rep}: log {r['log']}")
                if "postfix" in args.parts:
                    rundir = workdir / f"postfix-{rep}"
                    rundir.mkdir()
                    r = postfix_side.run_delivery(msgs, rundir, args.timeout)
                    results.setdefault("postfix", []).append(r)
                    print(f"Postfix rep {rep}: {r['msgs_per_s']:.0f} msg/s, "
                          f"{r['cpu_ms_per_msg']:.2f} ms CPU/msg, peak PSS "
                          f"{r['peak_pss_mb']:.0f} MB (RSS sum {r['peak_rss_mb']:.0f}), "
                          f"sink {r['sink_counted']}/{r['n']}, log {r['log']}", flush=True)
                    if not r["ok"]:
                        failures.append(f"Postfix rep {rep}: {r['log']}")
            if "latency" in args.parts:
                lat_msgs = make_messages(args.latency_messages, seed=7,
                                         same_domain=args.same_domain)
                rundir = workdir / "latency"
                rundir.mkdir()
                r = mxsend_side.run_latency(lat_msgs, rundir, dns.nameserver, args.timeout)
                results["latency"] = r
                if not r["ok"]:
                    failures.append(f"latency: {r['leftovers']} {r['log']}")
            if "deferred" in args.parts:
                parked = make_messages(args.deferred, seed=11)
                probes = make_messages(args.probes, seed=13, start=10**7,
                                       same_domain=args.same_domain)
                rundir = workdir / "deferred"
                rundir.mkdir()
                print(f"parking {args.deferred} deferred messages...", flush=True)
                r = mxsend_side.run_deferred(parked, probes, rundir, dns.nameserver,
                                             args.timeout)
                results["deferred"] = r
                if not r["ok"]:
                    failures.append(f"deferred: {r['leftovers']} {r['log']}")
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
