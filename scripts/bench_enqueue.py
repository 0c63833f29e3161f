"""Start-up cost of `mxsend enqueue` (docs/performance.md, "enqueue start-up").

    python scripts/bench_enqueue.py [--runs 20] [--mxsend PATH] [--json]

Runs the installed console script (default: the `mxsend` beside this interpreter) the
way cron and PHP do, one process per message, into a throw-away spool, and reports:

- wall time per run (min, median, mean) over --runs runs, next to the interpreter's
  own floor (`python -c pass`, the same interpreter with site-packages);
- what `python -X importtime` says the imports cost, and the ten costliest top-level
  imports, so a regression names its culprit;
- which of the daemon's heavy modules the command loaded (there should be none).

Wall time depends on the machine and its load: compare figures from one run of this
script, not across machines. The children run with bytecode caching on (without
PYTHONDONTWRITEBYTECODE), as an installed mxsend does: pip compiles its .pyc files at
install time, and without them each run would measure the compiler instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("lupa", "aiosmtplib", "dns", "cryptography", "uvloop", "watchdog", "asyncio", "ssl")
MESSAGE = b"From: bench@example.test\nSubject: bench\n\nbody\n"
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "MXSEND_CONFIG")}


def _timed(argv: list[str], stdin: bytes) -> float:
    start = time.perf_counter()
    subprocess.run(argv, input=stdin, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - start


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "min_ms": round(min(samples) * 1000, 1),
        "median_ms": round(statistics.median(samples) * 1000, 1),
        "mean_ms": round(statistics.fmean(samples) * 1000, 1),
    }


def _importtime(argv: list[str]) -> tuple[float, list[tuple[str, float]]]:
    """Total import time (ms) of top-level imports and the ten costliest of them."""
    result = subprocess.run(argv, input=MESSAGE, check=True, capture_output=True,
                            env=ENV)
    top: list[tuple[str, float]] = []
    for line in result.stderr.decode().splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if not name.startswith("  "):  # one space: a top-level import
            top.append((name.strip(), int(cumulative) / 1000))
    top.sort(key=lambda item: -item[1])
    return round(sum(ms for _, ms in top), 1), [(n, round(ms, 1)) for n, ms in top[:10]]


def _heavy_modules(python: str, config: Path) -> list[str]:
    code = (
        "import sys\n"
        "from mxsend.cli import main\n"
        "code = main(['enqueue', '-c', sys.argv[1], '-f', 'a@example.test', 'b@example.test'])\n"
        f"heavy = {HEAVY!r}\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([python, "-c", code, str(config)], input=MESSAGE, check=True,
                            capture_output=True, env=ENV)
    return result.stdout.decode().split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mxsend", default=str(Path(sys.executable).with_name("mxsend")))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="mxsend-bench-enqueue-") as tmp:
        config = Path(tmp) / "mxsend.toml"
        config.write_text(f'[spool]\npath = "{Path(tmp) / "spool"}"\n')
        command = [args.mxsend, "enqueue", "-c", str(config), "-f", "a@example.test",
                   "b@example.test"]
        _timed(command, MESSAGE)  # warm the page cache and the .pyc files
        floor = [_timed([python, "-c", "pass"], b"") for _ in range(args.runs)]
        runs = [_timed(command, MESSAGE) for _ in range(args.runs)]
        imports_ms, costliest = _importtime([python, "-X", "importtime", *command])
        heavy = _heavy_modules(python, config)
    report = {
        "runs": args.runs,
        "enqueue": _summary(runs),
        "python_floor": _summary(floor),
        "imports_ms": imports_ms,
        "costliest_imports_ms": costliest,
        "heavy_modules_loaded": heavy,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    e, f = report["enqueue"], report["python_floor"]
    print(f"mxsend enqueue, {args.runs} runs: min {e['min_ms']} ms, median "
          f"{e['median_ms']} ms, mean {e['mean_ms']} ms")
    print(f"python -c pass floor:     min {f['min_ms']} ms, median {f['median_ms']} ms")
    print(f"imports (python -X importtime, top level summed): {imports_ms} ms")
    for name, ms in costliest:
        print(f"  {ms:8.1f} ms  {name}")
    print(f"heavy modules loaded: {' '.join(heavy) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
