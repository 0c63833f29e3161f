"""Postfix itself on the same messages and sink: the baseline's "delivery" mode.

A private Postfix instance (its own config, queue and data directories under the work
directory, `postfix -c DIR`), so a system Postfix, if any, is never touched. Every route
is a loopback sink, set three ways (transport map, default/relay transport, relayhost),
DNS is disabled, and the listener is loopback-only; `check_loopback_only` refuses to
start anything else. Per-domain routing (the default) gives each recipient domain its
own next hop in the transport map (domain i -> smtp:[127.0.0.<2+i>]:PORT), as MX
routing would, so Postfix makes one transaction per domain like mxsend; one-hop routing
sends everything to one next hop, where Postfix merges the domains of a message into
one transaction. The timed phase: all N messages parked in the deferred
queue (injected over SMTP with defer_transports=smtp), defer_transports cleared and
Postfix reloaded, then from `postqueue -f` until the sink has counted N and every queue
directory is empty.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench_lib.procstat import Window, wait_until
from bench_lib.sink import HOST, Sinks, free_port
from bench_lib.workload import DOMAINS, Msg

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
MAIN_CF = """\
# scripts/bench: a private, loopback-only Postfix instance. Everything not set here
# keeps Postfix's defaults (concurrency, process limits, connection cache): that is
# what the comparison is about.
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {queue}
data_directory = {data}
myhostname = bench.localdomain
mydomain = localdomain
myorigin = $myhostname
append_dot_mydomain = no
biff = no
# nothing is local: every address is relayed
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# all roads lead to the sink
transport_maps = texthash:{etc}/transport
default_transport = smtp:[{host}]:{sink}
relay_transport = smtp:[{host}]:{sink}
relayhost = [{host}]:{sink}
# no DNS at all, no TLS (the sink offers none)
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
# a real MTA logs every delivery: that cost is part of the baseline
maillog_file = {log}
maillog_file_prefixes = {workdir}
"""


def transport_map(hosts: list[str], port: int) -> str:
    """Domain i to hosts[i] (per-domain routing), or every domain to the one host; a
    "*" catch-all to the first, as the baseline had."""
    routes = [f"smtp:[{hosts[i % len(hosts)]}]:{port}" for i in range(len(DOMAINS))]
    return ("".join(f"{d}\t{r}\n" for d, r in zip(DOMAINS, routes, strict=True))
            + f"*\tsmtp:[{hosts[0]}]:{port}\n")


def _run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Postfix's commands report errors on a tty or to syslog only; `script` would
    # be needed to see them, so failures below point at the instance's log instead.
    return subprocess.run(cmd, check=check, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


class PostfixInstance:
    def __init__(self, workdir: Path, sink_port: int, sink_hosts: list[str] | None = None
                 ) -> None:
        self.dir = workdir / "postfix"
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.log = self.dir / "postfix.log"
        self.sink_port = sink_port
        # one host: every domain to it; one per domain: domain i to sink_hosts[i]
        self.sink_hosts = sink_hosts or [HOST]
        self.smtpd_port = free_port()

    # -- set-up
    def configure(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the Postfix side needs root (postfix start, postsuper)")
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")
        (self.etc / "main.cf").write_text(MAIN_CF.format(
            etc=self.etc, queue=self.queue, data=self.data, host=self.sink_hosts[0],
            sink=self.sink_port, log=self.log, workdir=self.dir))
        (self.etc / "transport").write_text(transport_map(self.sink_hosts, self.sink_port))
        # Debian's master.cf as shipped (chroot included), with smtpd on a free
        # loopback port instead of :25, so a system MTA is never in the way.
        master = Path("/etc/postfix/master.cf").read_text()
        master, count = re.subn(r"^smtp(\s+)inet", f"{HOST}:{self.smtpd_port} inet", master,
                                count=1, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError("no 'smtp inet' service in /etc/postfix/master.cf")
        (self.etc / "master.cf").write_text(master)
        self.log.touch()
        # the chroot gets what Debian's configure-instance.sh copies (local files only)
        for name in ("localtime", "services", "hosts", "nsswitch.conf", "host.conf"):
            src = Path("/etc") / name
            if src.exists():
                (self.queue / "etc").mkdir(exist_ok=True)
                shutil.copy2(src, self.queue / "etc" / name)
        self.postfix("check")
        self.check_loopback_only()

    def postconf(self, *args: str) -> str:
        return _run("postconf", "-c", str(self.etc), *args).stdout.strip()

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = _run("postfix", "-c", str(self.etc), *args, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed (exit {res.returncode}); "
                               f"see {self.log}: {self.log_tail()}")
        return res

    def log_tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def check_loopback_only(self) -> None:
        """Refuse to start unless this instance can only ever reach the loopback sink."""
        def fail(why: str) -> None:
            raise RuntimeError(f"Postfix config is not loopback-only: {why}")
        pc = self.postconf
        if pc("-h", "inet_interfaces") != "loopback-only":
            fail("inet_interfaces")
        if pc("-h", "smtp_dns_support_level") != "disabled":
            fail("smtp_dns_support_level is not disabled")
        if pc("-h", "mydestination"):
            fail("mydestination is not empty")
        loop = re.compile(r"\[127\.\d+\.\d+\.\d+\](:\d+)?$")
        for key in ("relayhost", "default_transport", "relay_transport"):
            if not loop.search(pc("-h", key)):
                fail(f"{key} is not a bracketed loopback address")
        transport = pc("-h", "transport_maps")
        if not transport.startswith("texthash:"):
            fail(f"transport_maps={transport}")
        keys = []
        for line in Path(transport.removeprefix("texthash:")).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            key, value = line.split(None, 1)
            keys.append(key)
            if not re.fullmatch(r"smtp:\[127\.\d+\.\d+\.\d+\](:\d+)?", value.strip()):
                fail(f"transport entry {line!r}")
        if "*" not in keys:
            fail("no '*' catch-all in the transport map")
        for line in (self.etc / "master.cf").read_text().splitlines():
            if re.match(r"^[^#\s]\S*\s+inet\s", line) and not line.startswith("127."):
                fail(f"master.cf listener {line.split()[0]} is not on loopback")

    # -- control
    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> bool:
        return self.postfix("status", check=False).returncode == 0

    def start(self) -> None:
        self.check_loopback_only()
        self.postfix("start")

    def stop(self) -> None:
        pid = self.master_pid()
        if self.running():
            self.postfix("stop", check=False)
        deadline = time.monotonic() + 30
        while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)

    def set_defer(self, on: bool) -> None:
        if on:
            self.postconf("-e", "defer_transports=smtp")
        else:
            self.postconf("-X", "defer_transports")

    def queue_counts(self) -> dict[str, int]:
        out = {}
        for q in QUEUES:
            out[q] = sum(len(files) for _r, _d, files in os.walk(self.queue / q))
        return out

    def queue_empty(self) -> bool:
        return sum(self.queue_counts().values()) == 0

    def clear_queue(self) -> None:
        _run("postsuper", "-c", str(self.etc), "-d", "ALL", check=False)

    # -- injection: C persistent SMTP connections into this instance's smtpd
    def inject(self, msgs: list[Msg], conns: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        errors: list[BaseException] = []

        def worker(part: list[Msg]) -> None:
            try:
                with smtplib.SMTP(HOST, self.smtpd_port, local_hostname="bench.invalid",
                                  timeout=60) as client:
                    for m in part:
                        if time.monotonic() > deadline:
                            raise TimeoutError("SMTP injection into Postfix took too long")
                        client.sendmail(m.sender, list(m.rcpts), m.data)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(msgs[i::conns],))
                   for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        if errors or any(t.is_alive() for t in threads):
            raise RuntimeError(f"SMTP injection into Postfix failed: {errors[:3]}")

    def check_log(self, rcpts: int) -> dict[str, Any]:
        """Every recipient sent, none bounced, and every relay was the sink."""
        sent = bounced = deferred = 0
        relays: set[str] = set()
        with open(self.log, errors="replace") as handle:
            for line in handle:
                if " status=" not in line:
                    continue
                if "status=sent" in line:
                    sent += 1
                elif "status=bounced" in line:
                    bounced += 1
                elif "status=deferred" in line:
                    deferred += 1
                i = line.find(" relay=")
                if i >= 0:
                    relays.add(line[i + 7 :].split(",", 1)[0])
        sinks = {f"{h}[{h}]:{self.sink_port}" for h in self.sink_hosts}
        ok = sent == rcpts and bounced == 0 and relays <= sinks | {"none"}
        return {"sent_rcpts": sent, "bounced": bounced, "deferred_lines": deferred,
                "relays": sorted(relays), "ok": ok}


def run_delivery(msgs: list[Msg], workdir: Path, timeout: float,
                 conns: int = 10, sink_hosts: list[str] | None = None) -> dict[str, Any]:
    hosts = sink_hosts or [HOST]
    n = len(msgs)
    rcpts = sum(len(m.rcpts) for m in msgs)
    # one transaction per next hop of a message: per domain, or one for one hop
    expected = n if len(hosts) == 1 else sum(m.domains for m in msgs)
    res: dict[str, Any] = {"n": n, "rcpts": rcpts, "bytes": sum(len(m.data) for m in msgs),
                           "expected_transactions": expected, "sink_hosts": hosts}
    with Sinks(workdir, "sink-postfix", hosts) as sink:
        pf = PostfixInstance(workdir, sink.port, hosts)
        res["version"] = _run("postconf", "-d", "-h", "mail_version").stdout.strip()
        try:
            pf.configure()
            pf.stop()
            pf.set_defer(False)
            pf.clear_queue()
            pf.log.write_text("")
            pf.set_defer(True)
            pf.start()
            time.sleep(1.0)  # let master spawn its first daemons
            t = time.perf_counter()
            pf.inject(msgs, conns, timeout)
            res["inject_s"] = time.perf_counter() - t
            deadline = time.monotonic() + timeout
            while True:  # all N parked in deferred?
                q = pf.queue_counts()
                if q["deferred"] == n and q["incoming"] == q["active"] == q["maildrop"] == 0:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Postfix deferral did not settle: {q}")
                time.sleep(0.2)
            if sink.mesg() != 0:
                raise RuntimeError("Postfix delivered while defer_transports was set")
            pf.set_defer(False)
            pf.postfix("reload")
            time.sleep(2.0)  # reload: daemons restart
            master = pf.master_pid()
            if master is None:
                raise RuntimeError("Postfix master is not running")
            # ---- timed phase
            with Window(master, sink) as window:
                _run("postqueue", "-c", str(pf.etc), "-f")
                deadline = time.monotonic() + timeout
                t_sink = wait_until(lambda: sink.mesg() >= expected, deadline, lambda: (
                    f"sink has {sink.mesg()} of {expected}; queue {pf.queue_counts()}"))
                wait_until(pf.queue_empty, deadline,
                           lambda: f"Postfix queue not empty: {pf.queue_counts()}")
                window.end()
            figures = window.figures(n)
            # the baseline's key for the RSS sum (shared pages counted per process)
            figures["peak_rss_mb"] = figures.pop("peak_rss_sum_mb")
            res.update(figures)
            res["wall_to_sink_s"] = t_sink - window.t0
        finally:
            pf.stop()
            pf.set_defer(False)
        if "sink_counted" in res:  # Postfix's cached connections end at its stop
            res["sink_sessions"] = sink.sessions()
    res["log"] = pf.check_log(rcpts)
    res["ok"] = res.get("sink_counted") == expected and res["log"]["ok"]
    return res
