"""mxsend under measurement: `run --once` throughput, idle latency (deferred_side.py: a
big deferred queue; listener_side.py: the SMTP listener as the way in)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench_lib.procstat import (
    TreeMonitor,
    sys_cpu,
    tree_sample,
    tree_vm,
    vm_status,
)
from bench_lib.sink import HOST, Sinks
from bench_lib.workload import SENDER, Msg, drop_message, fill_spool, to_bsmtp

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "scripts" / "bench_mxout.lua"
# queue.scan_interval (the default): a message whose new/ event is missed is still picked
# up by the next rescan, so a latency wait must outlast it to measure, not fail.
SCAN_INTERVAL = 30.0
LATENCY_WAIT = 2 * SCAN_INTERVAL + 5


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, *, spool: Path, sink_port: int, nameserver: str,
                 scan_interval: float = SCAN_INTERVAL, log_level: str = "warning",
                 processes: int | str = "auto", mta_sts: bool = True,
                 extra_toml: str = "", dkim: list[dict[str, object]] | None = None) -> Path:
    """The bench's mxsend config. `mta_sts` is the shipped default (on): with no policy
    published that is one TXT lookup per domain (cached), part of the plain figure;
    `--no-mta-sts` prices it. `extra_toml` is appended verbatim (the feature options'
    sections: [listen], [[shape]], [cluster], ...); `dkim` are [[dkim.key]] tables."""
    assert nameserver.startswith("127."), "the benchmark only resolves through loopback"
    sections: dict[str, dict[str, object]] = {
        "spool": {"path": str(spool)},
        "script": {"path": str(LUA)},
        "dns": {"nameservers": [nameserver], "timeout": "2s"},
        # helo_name set: "" would mean socket.getfqdn(), a lookup that may leave loopback
        # The sink is on loopback, which contract §10 refuses unless allowed.
        "smtp": {"port": sink_port, "helo_name": "bench.localdomain",
                 "allowed_destinations": ["127.0.0.0/8", "::1/128"]},
        "queue": {"scan_interval": scan_interval, "shutdown_grace": "10s",
                  "processes": processes},
        "log": {"format": "json", "level": log_level},
        "tls": {"mta_sts": mta_sts},
    }
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        lines.append("")
    for table in dkim or []:  # --dkim: [[dkim.key]] tables (contract §7)
        lines.append("[[dkim.key]]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines) + extra_toml)
    return path


# --dkim: which keys sign every message (RSA-2048, or RSA-2048 and Ed25519: dual).
DKIM_MODES = {"rsa": ("rsa",), "rsa+ed25519": ("rsa", "ed25519")}


def dkim_keys(workdir: Path, mode: str) -> list[dict[str, object]]:
    """Keys made by `mxsend dkim keygen` in `workdir` for the workload's From: domain."""
    domain = SENDER.rpartition("@")[2]
    tables: list[dict[str, object]] = []
    for kind in DKIM_MODES[mode]:
        path = workdir / f"dkim-{kind}.pem"
        if not path.exists():
            subprocess.run([mxsend_exe(), "dkim", "keygen", domain, f"bench-{kind}",
                            "--type", kind, "--out", str(path)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tables.append({"domain": domain, "selector": f"bench-{kind}", "key_file": str(path)})
    return tables


def mxsend_exe() -> str:
    exe = ROOT / ".venv" / "bin" / "mxsend"
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing: run scripts/bench (it makes the venv)")
    return str(exe)


def spool_leftovers(spool: Path) -> dict[str, int]:
    """Files still in the spool's folders (dot-files and owners/ heartbeats aside)."""
    out: dict[str, int] = {}
    for sub in ("new", "incoming", "msg", "queue", "active", "bad"):
        count = 0
        for _root, _dirs, files in os.walk(spool / sub):
            count += sum(1 for f in files if not f.startswith("."))
        if count:
            out[sub] = count
    return out


def log_summary(path: Path) -> dict[str, Any]:
    """Event counts in a JSON log (at log.level warning most runs log nothing)."""
    events: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    other = 0
    first: list[str] = []
    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                other += 1
                if len(first) < 5:
                    first.append(line.rstrip()[:300])
                continue
            events[str(record.get("event", record.get("msg", "?")))] += 1
            if "status" in record:
                statuses[str(record["status"])] += 1
            if len(first) < 5:
                first.append(line.rstrip()[:300])
    return {"events": dict(events), "statuses": dict(statuses), "non_json_lines": other,
            "first_lines": first}


def _wait4(pid: int) -> tuple[int, Any] | None:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status), usage


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_until(cond: Callable[[], bool], timeout: float, what: str,
                interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------- throughput
def run_once(msgs: list[Msg], workdir: Path, nameserver: str, timeout: float,
             processes: int | str = "auto", sink_hosts: list[str] | None = None,
             mta_sts: bool = True, extra_toml: str = "", dkim: str | None = None
             ) -> dict[str, Any]:
    """Fill a spool, then time `mxsend run --once` until the sink has everything."""
    spool = workdir / "spool-once"
    if spool.exists():
        raise RuntimeError(f"{spool} exists: use a fresh --workdir")
    t = time.perf_counter()
    fill_spool(spool, msgs)
    fill_s = time.perf_counter() - t
    expected = sum(m.domains for m in msgs)
    res: dict[str, Any] = {
        "n": len(msgs), "rcpts": sum(len(m.rcpts) for m in msgs),
        "bytes": sum(len(m.data) for m in msgs), "expected_transactions": expected,
        "fill_s": fill_s, "dkim": dkim,
    }
    log = workdir / "mxsend-once.log"
    with Sinks(workdir, "sink-once", sink_hosts or [HOST]) as sink:
        config = write_config(workdir / "mxsend-once.toml", spool=spool, sink_port=sink.port,
                              nameserver=nameserver, processes=processes, mta_sts=mta_sts,
                              extra_toml=extra_toml,
                              dkim=dkim_keys(workdir, dkim) if dkim else None)
        os.sync()  # the fill's writeback must not land inside the timed window
        time.sleep(0.5)
        busy0, _ = sys_cpu()
        sink_cpu0 = sink.cpu()
        t0 = time.perf_counter()
        with open(log, "wb") as err:
            proc = subprocess.Popen([mxsend_exe(), "-c", str(config), "run", "--once"],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        monitor = TreeMonitor(proc.pid, progress=sink.mesg, interval=0.5)
        monitor.start()
        t_sink = None
        exited: tuple[int, Any] | None = None
        hwm = 0
        try:
            deadline = time.monotonic() + timeout
            while exited is None:
                if t_sink is None and sink.mesg() >= expected:
                    t_sink = time.perf_counter()
                hwm = max(hwm, vm_status(proc.pid).get("VmHWM", 0))
                exited = _wait4(proc.pid)
                if exited is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"mxsend run --once still running after {timeout:.0f}s; "
                            f"sink has {sink.mesg()} of {expected}")
                    time.sleep(0.02)
            t_exit = time.perf_counter()
            proc.returncode = exited[0]
        finally:
            peak = monitor.stop()
            _stop_process(proc)
        busy1, _ = sys_cpu()
        code, usage = exited
        wall = t_exit - t0
        cpu = usage.ru_utime + usage.ru_stime
        res.update({
            "exit_code": code,
            "wall_s": wall,
            "wall_to_sink_s": (t_sink - t0) if t_sink else None,
            "msgs_per_s": len(msgs) / wall,
            "cpu_s": cpu,
            "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime,
            "cpu_ms_per_msg": cpu / len(msgs) * 1000,
            # the daemon's own peak RSS, exact; it also runs a Lua worker process, so
            # the comparable figure is the tree's PSS sum, sampled like Postfix's
            "peak_rss_mb": max(usage.ru_maxrss * 1024, hwm) / 2**20,
            "peak_pss_mb": peak.pss / 2**20,
            "peak_rss_sum_mb": peak.rss / 2**20,
            "peak_nproc": peak.nproc,
            "machine_busy_cores": (busy1 - busy0) / wall,
            "sink_cpu_s": sink.cpu() - sink_cpu0,
            "sink_counted": sink.mesg(),
            "sink_sessions": sink.sessions(),
            "timeline": peak.timeline,
        })
    res["leftovers"] = spool_leftovers(spool)
    res["log"] = log_summary(log)
    res["ok"] = (code == 0 and res["sink_counted"] == expected and not res["leftovers"])
    return res


# ------------------------------------------------------------------- a live daemon
class NotifySocket:
    """Our own $NOTIFY_SOCKET: the daemon sends READY=1 after its first scan.

    Like a service manager, it keeps reading for the daemon's whole life: the daemon
    also sends WATCHDOG=1 every few seconds, and a full datagram queue
    (net.unix.max_dgram_qlen, 10 by default) would block the daemon's send.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.ready_at: float | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.messages: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.perf_counter()
            for item in data.decode(errors="replace").split("\n"):
                self.messages[item] += 1
                if item == "READY=1" and self.ready_at is None:
                    self.ready_at = now
                    self._ready.set()

    def wait_ready(self, timeout: float) -> float:
        """perf_counter() when READY=1 arrived."""
        if not self._ready.wait(timeout) or self.ready_at is None:
            raise TimeoutError(f"no READY=1 from the daemon within {timeout:.0f}s")
        return self.ready_at

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@contextlib.contextmanager
def daemon(config: Path, workdir: Path, log: Path, ready_timeout: float
           ) -> Iterator[tuple[subprocess.Popen[bytes], float, float]]:
    """`mxsend run` (not --once); yields (process, t_start, t_ready) and stops it by PID."""
    notify = NotifySocket(workdir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    with open(log, "wb") as err:
        t_start = time.perf_counter()
        proc = subprocess.Popen([mxsend_exe(), "-c", str(config), "run"], env=env,
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        t_ready = notify.wait_ready(ready_timeout)
        yield proc, t_start, t_ready
    finally:
        _stop_process(proc)
        notify.close()


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def latencies(sink: Sinks, spool: Path, msgs: list[Msg], prefix: str,
              per_message_timeout: float = LATENCY_WAIT) -> list[float]:
    """Drop each message into new/ by the writers' protocol; time until the sink has it."""
    out: list[float] = []
    base = sink.mesg()
    for i, msg in enumerate(msgs):
        raw = to_bsmtp(msg)
        want = base + msg.domains
        t0 = time.perf_counter()
        drop_message(spool, f"{prefix}{i:06d}", raw)
        deadline = time.monotonic() + per_message_timeout
        while sink.mesg() < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"message {prefix}{i:06d} not at the sink after "
                                   f"{per_message_timeout:.0f}s")
            time.sleep(0.0005)
        out.append(time.perf_counter() - t0)
        base = want
        time.sleep(0.02)  # one message at a time, on an otherwise idle daemon
    return out


def _latency_stats(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {"count": len(ms), "p50_ms": statistics.median(ms), "p99_ms": _percentile(ms, 99),
            "min_ms": min(ms), "max_ms": max(ms), "mean_ms": statistics.fmean(ms),
            # the ones that waited for a rescan instead of the new/ watch
            "over_5s": sum(1 for v in ms if v > 5000)}


def run_latency(msgs: list[Msg], workdir: Path, nameserver: str,
                timeout: float, sink_hosts: list[str] | None = None) -> dict[str, Any]:
    spool = workdir / "spool-latency"
    for sub in ("tmp", "new"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    log = workdir / "mxsend-latency.log"
    with Sinks(workdir, "sink-latency", sink_hosts or [HOST]) as sink:
        config = write_config(workdir / "mxsend-latency.toml", spool=spool,
                              sink_port=sink.port, nameserver=nameserver)
        with daemon(config, workdir, log, timeout) as (proc, t_start, t_ready):
            values = latencies(sink, spool, msgs, "L")
            rss = tree_vm(proc.pid)
            tree = tree_sample(proc.pid)
            cpu = tree["cpu"]
        res: dict[str, Any] = {
            "start_to_ready_s": t_ready - t_start,
            **_latency_stats(values),
            "daemon_cpu_s": cpu,
            "rss_mb": rss.get("VmRSS", 0) / 2**20,
            "peak_rss_mb": rss.get("VmHWM", 0) / 2**20,
            "pss_sum_mb": tree["pss"] / 2**20,  # every process: daemons, Lua workers
            "nproc": tree["nproc"],
            "sink_counted": sink.mesg(),
        }
    res["leftovers"] = spool_leftovers(spool)
    res["log"] = log_summary(log)
    res["ok"] = res["sink_counted"] == sum(m.domains for m in msgs) and not res["leftovers"]
    return res
