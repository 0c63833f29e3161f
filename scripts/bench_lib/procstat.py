"""CPU and memory of processes from /proc (Linux), the way the Postfix baseline counted them."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    # comm may hold spaces or parentheses: split after the last ")"
    return data[data.rindex(b")") + 2 :].split()


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
