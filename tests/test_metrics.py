"""Prometheus metrics (contract §10): a real HTTP scrape, several recording processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxsend import metrics
from mxsend.config import Config, config_from_mapping
from mxsend.errors import ConfigError
from tests.fixtures.daemon import REPO
from tests.fixtures.ports import free_port


def make_config(spool: Path) -> Config:
    return config_from_mapping({"spool": {"path": str(spool)},
                                "metrics": {"listen": f"127.0.0.1:{free_port()}"}})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Config, metrics.MetricsServer]]:
    config = make_config(tmp_path / "spool")
    server = metrics.start_metrics_server(config)
    try:
        yield config, server
    finally:
        import asyncio

        asyncio.run(server.close())


def scrape(port: int) -> dict[str, float]:
    """GET /metrics on 127.0.0.1:`port` and parse the samples: {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_every_family_is_there_at_zero_from_the_start(
        served: tuple[Config, metrics.MetricsServer]) -> None:
    _, server = served
    samples = scrape(server.port)
    for status in ("sent", "deferred", "bounced"):
        assert samples[f'mxsend_deliveries_total{{status="{status}"}}'] == 0
    for kind in ("failure", "delay", "relayed", "success"):
        assert samples[f'mxsend_bounces_total{{kind="{kind}"}}'] == 0
    for function in ("CheckFile", "ServerDetails", "load"):
        assert samples[f'mxsend_script_errors_total{{function="{function}"}}'] == 0
    assert samples['mxsend_tls_sessions_total{version="TLSv1.3"}'] == 0
    for state in ("queued", "active", "held", "bad"):
        assert samples[f'mxsend_queue_messages{{state="{state}"}}'] == 0
    assert samples["mxsend_queue_oldest_age_seconds"] == 0
    assert samples["mxsend_connections_open"] == 0
    assert samples["mxsend_suspended_destinations"] == 0
    assert samples["mxsend_delivery_seconds_count"] == 0
    assert samples['mxsend_transaction_seconds_bucket{le="+Inf"}'] == 0


_RECORDER = """
import sys
from mxsend import metrics
from mxsend.config import config_from_mapping
config = config_from_mapping({"metrics": {"listen": sys.argv[1]}})
assert metrics.join_from_environment(config)
for _ in range(int(sys.argv[2])):
    metrics.delivered("sent")
    metrics.transaction(0.2)
metrics.delivered("deferred")
metrics.delivered("no such status")
metrics.bounce("failure")
metrics.script_error("CheckFile")
metrics.tls_session("TLSv1.3")
metrics.connection_opened()
metrics.connection_opened()
metrics.suspended(3)
metrics.delivery(42.0)
print("recorded", flush=True)
sys.stdin.read()  # stay alive until the test closes stdin
"""


def _recorder(config: Config, count: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _RECORDER, config.metrics.listen, str(count)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == "recorded\n"
    return process


def test_two_processes_are_summed(served: tuple[Config, metrics.MetricsServer]) -> None:
    config, server = served
    first, second = _recorder(config, 1000), _recorder(config, 234)
    try:
        samples = scrape(server.port)
        assert samples['mxsend_deliveries_total{status="sent"}'] == 1234
        assert samples['mxsend_deliveries_total{status="deferred"}'] == 2
        assert samples['mxsend_deliveries_total{status="other"}'] == 2  # bounded labels
        assert samples['mxsend_bounces_total{kind="failure"}'] == 2
        assert samples['mxsend_script_errors_total{function="CheckFile"}'] == 2
        assert samples['mxsend_tls_sessions_total{version="TLSv1.3"}'] == 2
        assert samples["mxsend_transaction_seconds_count"] == 1234
        assert samples['mxsend_transaction_seconds_bucket{le="0.25"}'] == 1234
        assert samples['mxsend_transaction_seconds_bucket{le="0.1"}'] == 0
        assert samples["mxsend_delivery_seconds_count"] == 2
        # Gauges of live processes: connections add up, suspensions are the spool's.
        assert samples["mxsend_connections_open"] == 4
        assert samples["mxsend_suspended_destinations"] == 3
        assert not any("pid" in name for name in samples)
    finally:
        for process in (first, second):
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=10)
    # Dead daemons: their counters stay (sums never go down), their live gauges go.
    samples = scrape(server.port)
    assert samples['mxsend_deliveries_total{status="sent"}'] == 1234
    assert samples["mxsend_connections_open"] == 0


def test_queue_gauges_describe_the_spool(
        served: tuple[Config, metrics.MetricsServer]) -> None:
    config, server = served
    spool = config.spool.path
    for folder in ("new", "queue", "msg", "active/host-1-a", "incoming/host-1-a", "bad",
                   "hold"):
        (spool / folder).mkdir(parents=True, exist_ok=True)
    now = time.time()
    for path in ("new/N1", "queue/Q1", "queue/Q2", "incoming/host-1-a/I1",
                 "active/host-1-a/A1", "active/host-1-a/.spare-0", "bad/B1",
                 "bad/B1.reason", "hold/H1", "msg/Q1", "msg/Q2"):
        (spool / path).write_text("x")
    os.utime(spool / "msg/Q1", (now - 3600, now - 3600))
    samples = scrape(server.port)
    assert samples['mxsend_queue_messages{state="queued"}'] == 4
    assert samples['mxsend_queue_messages{state="active"}'] == 1
    assert samples['mxsend_queue_messages{state="held"}'] == 1
    assert samples['mxsend_queue_messages{state="bad"}'] == 1
    assert 3600 <= samples["mxsend_queue_oldest_age_seconds"] < 3700


def test_recording_is_a_no_op_while_metrics_are_off() -> None:
    assert not metrics.join_from_environment(config_from_mapping({}))
    metrics.delivered("sent")  # no error, nothing to record into
    metrics.connection_closed()


def test_cost_per_call_is_a_few_microseconds(
        served: tuple[Config, metrics.MetricsServer]) -> None:
    calls = 20_000
    started = time.perf_counter()
    for _ in range(calls):
        metrics.delivered("sent")
    per_call = (time.perf_counter() - started) / calls
    # ~2 µs measured (docs/metrics.md); a generous bound for a loaded test machine.
    assert per_call < 100e-6


@pytest.mark.parametrize(("value", "error"), [
    ("127.0.0.1", "metrics.listen"), ("localhost:9464", "metrics.listen"),
    (9464, "metrics.listen"),
])
def test_config_errors_name_the_key(value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{error}:"):
        config_from_mapping({"metrics": {"listen": value}})


def test_a_port_in_use_names_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_from_mapping({"spool": {"path": str(tmp_path)},
                                      "metrics": {"listen": f"127.0.0.1:{port}"}})
        with pytest.raises(OSError, match=r"^\[Errno 98\] metrics.listen: cannot listen"):
            metrics.start_metrics_server(config)
    assert metrics.MULTIPROC_ENV not in os.environ

