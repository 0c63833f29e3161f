"""CPU and memory of processes from /proc (Linux), the way the Postfix baseline counted them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> tuple[str, list[bytes]]:
    """(comm, the fields after it) of /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    # comm may hold spaces or parentheses: it ends at the last ")"
    end = data.rindex(b")")
    return data[data.index(b"(") + 1 : end].decode(errors="replace"), data[end + 2 :].split()


def _stat_fields(pid: int) -> list[bytes]:
    return _stat(pid)[1]


def proc_cpu(pid: int) -> tuple[float, float, int]:
    """(own CPU s, reaped children's CPU s, ppid) of one process."""
    fields = _stat_fields(pid)
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK, int(fields[1])


def proc_mem(pid: int) -> tuple[int, int]:
    """(RSS bytes, PSS bytes) of one process; PSS 0 where smaps_rollup is unavailable."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm") as handle:
            rss = int(handle.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of one process, in bytes."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_sample(root: int) -> dict[str, float]:
    """CPU s (own + reaped children, for the root and every live descendant), RSS, PSS sums.

    A daemon that exits between two samples moves into its parent's reaped-children
    counter, so differences of `cpu` are exact.
    """
    cpu = 0.0
    rss = pss = nproc = 0
    for pid in [root, *descendants(root)]:
        try:
            own, reaped, _ = proc_cpu(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        r, p = proc_mem(pid)
        cpu += own + reaped
        rss += r
        pss += p
        nproc += 1
    return {"cpu": cpu, "rss": rss, "pss": pss, "nproc": nproc}


def command_kind(pid: int) -> str:
    """What a process is, for the CPU breakdown: its command name (Postfix's `smtp`,
    `qmgr`, ...), and for Python, the mxsend daemon or its Lua worker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
        comm = _stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    if comm.startswith("python"):
        if any(b"luasandbox" in arg for arg in argv):
            return "lua worker"
        return "mxsend"
    return comm


def own_cpu_by_pid(root: int) -> dict[int, tuple[str, float]]:
    """(kind, own CPU s) of the root and each live descendant."""
    out: dict[int, tuple[str, float]] = {}
    for pid in [root, *descendants(root)]:
        try:
            own, _, _ = proc_cpu(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        kind = command_kind(pid)
        out[pid] = (f"{kind} (root)" if pid == root else kind, own)
    return out


def tree_vm(root: int) -> dict[str, int]:
    """VmRSS and VmHWM of the largest process of a tree (with queue.processes > 1 the
    root is the small supervisor and the daemons are its children), in bytes."""
    rss = hwm = 0
    for pid in [root, *descendants(root)]:
        status = vm_status(pid)
        rss = max(rss, status.get("VmRSS", 0))
        hwm = max(hwm, status.get("VmHWM", 0))
    return {"VmRSS": rss, "VmHWM": hwm}


def sys_cpu() -> tuple[float, float]:
    """(busy s, total s) over all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0
    busy = user + nice + system + irq + softirq
    return busy / CLK_TCK, (busy + idle + iowait + steal) / CLK_TCK


@dataclass
class Peak:
    rss: int = 0
    pss: int = 0
    nproc: int = 0
    samples: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)


class TreeMonitor(threading.Thread):
    """Samples a process tree's memory (peak RSS and PSS sums) and a progress counter."""

    def __init__(self, root: int | None, progress: object = None, interval: float = 0.5,
                 root_lookup: object = None) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.root_lookup = root_lookup  # callable returning the root pid (Postfix's master)
        self.progress = progress  # callable returning a count, for the timeline
        self.interval = interval
        self.peak = Peak()
        self.t0 = time.perf_counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            root = self.root_lookup() if callable(self.root_lookup) else self.root
            if root:
                sample = tree_sample(root)
                self.peak.rss = max(self.peak.rss, int(sample["rss"]))
                self.peak.pss = max(self.peak.pss, int(sample["pss"]))
                self.peak.nproc = max(self.peak.nproc, int(sample["nproc"]))
                self.peak.samples += 1
            if callable(self.progress):
                self.peak.timeline.append(
                    (round(time.perf_counter() - self.t0, 2), int(self.progress()))
                )
            self._stop_event.wait(self.interval)

    def stop(self) -> Peak:
        self._stop_event.set()
        self.join(timeout=10)
        return self.peak


class Window:
    """One timed phase of a process tree that feeds a sink, measured the same way for
    every side: wall time; the tree's CPU as a difference of its /proc counters (so
    only what the tree did inside the window); the sink's CPU; the machine's busy cores;
    the tree's peak memory, sampled by a TreeMonitor. `root` is the tree's root pid,
    or a callable giving it (Postfix's master, looked up on each sample).

        with Window(pid, sink) as window:
            ...              # the timed work
            window.end()     # the clock stops here; figures() reports
    """

    def __init__(self, root: int | Callable[[], int | None], sink: Any,
                 interval: float = 0.5) -> None:
        self._root = root
        self._sink = sink
        if callable(root):
            self._monitor = TreeMonitor(None, progress=sink.mesg, interval=interval,
                                        root_lookup=root)
        else:
            self._monitor = TreeMonitor(root, progress=sink.mesg, interval=interval)
        self.peak = Peak()
        self.t0 = self.t1 = 0.0
        self._cpu0 = self._cpu1 = self._busy0 = self._busy1 = self._sink0 = 0.0
        self._own0: dict[int, tuple[str, float]] = {}
        self._own1: dict[int, tuple[str, float]] = {}

    def _root_pid(self) -> int:
        root = self._root() if callable(self._root) else self._root
        if not root:
            raise RuntimeError("the measured process tree has no root process")
        return root

    def _cpu(self) -> float:
        return tree_sample(self._root_pid())["cpu"]

    def __enter__(self) -> Window:
        self._cpu0 = self._cpu()
        self._own0 = own_cpu_by_pid(self._root_pid())
        self._sink0 = self._sink.cpu()
        self._busy0, _ = sys_cpu()
        self.t0 = time.perf_counter()
        self._monitor.start()
        return self

    def end(self) -> None:
        self.t1 = time.perf_counter()
        self._cpu1 = self._cpu()
        self._own1 = own_cpu_by_pid(self._root_pid())
        self._busy1, _ = sys_cpu()

    def __exit__(self, *exc: object) -> None:
        self.peak = self._monitor.stop()

    def _cpu_by_kind(self) -> dict[str, float]:
        return _sum_by_kind(self._own0, self._own1)

    def figures(self, n: int) -> dict[str, Any]:
        """The window's figures for `n` messages (after end() and the with block)."""
        wall = self.t1 - self.t0
        cpu = self._cpu1 - self._cpu0
        return {
            "wall_s": wall,
            "msgs_per_s": n / wall,
            "cpu_s": cpu,
            "cpu_ms_per_msg": cpu / n * 1000,
            "peak_pss_mb": self.peak.pss / 2**20,
            "peak_rss_sum_mb": self.peak.rss / 2**20,  # shared pages counted per process
            "peak_nproc": self.peak.nproc,
            "machine_busy_cores": (self._busy1 - self._busy0) / wall,
            "sink_cpu_s": self._sink.cpu() - self._sink0,
            # Where the tree's CPU went, for the processes alive at the window's end
            # (one that ended inside it is in cpu_s alone).
            "cpu_s_by_kind": self._cpu_by_kind(),
            "sink_counted": self._sink.mesg(),
            "sink_sessions": self._sink.sessions(),
            "timeline": self.peak.timeline,
        }


def _sum_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
                 ) -> dict[str, float]:
    """CPU s within the window by kind: a process born inside it counts whole."""
    out: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        out[kind] = round(out.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1], 2)
    return out


def wait_until(done: Callable[[], bool], deadline: float, problem: Callable[[], str],
               interval: float = 0.05) -> float:
    """Poll `done` until true, by time.monotonic() `deadline`; TimeoutError saying
    `problem()` past it. Returns time.perf_counter() when it became true."""
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(problem())
        time.sleep(interval)
    return time.perf_counter()
