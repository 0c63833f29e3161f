"""How the daemon's parts feed the metrics (contract §10), scraped over real HTTP: the
log's events through log.observe, suspensions from the Limiter."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mxsend import log, metrics
from mxsend.limiter import Limiter
from tests.test_metrics import make_config, scrape


def test_logged_events_are_counted_whatever_the_level(tmp_path: Path) -> None:
    server = metrics.start_metrics_server(make_config(tmp_path / "spool"))
    logger = log.get_logger()
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)  # the info events are not written, still counted
        log.event("delivery", "Q1", recipient="a@b.test", status="sent")
        log.event("delivery", "Q1", recipient="c@b.test", status="deferred")
        log.event("bounce", "Q1", bounce_id="Q2", recipients=["c@b.test"], kind="failure")
        log.event("script_error", "Q1", function="CheckFile", error="x")
        log.event("queued", "Q3", sender="a@b.test", recipients=["a@b.test"], size=1)
        samples = scrape(server.port)
        assert samples['mxsend_deliveries_total{status="sent"}'] == 1
        assert samples['mxsend_deliveries_total{status="deferred"}'] == 1
        assert samples['mxsend_bounces_total{kind="failure"}'] == 1
        assert samples['mxsend_script_errors_total{function="CheckFile"}'] == 1
    finally:
        logger.setLevel(level)
        asyncio.run(server.close())
    # Metrics off: the observer is gone, events cost no counting.
    log.event("delivery", "Q1", recipient="a@b.test", status="sent")
    assert metrics.observe_event not in log._observers


def test_a_suspension_written_sets_the_gauge(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    server = metrics.start_metrics_server(make_config(spool))
    try:
        limiter = Limiter(spool)
        limiter.suspend("example.org", 60, "421 4.7.0 slow down")
        assert scrape(server.port)["mxsend_suspended_destinations"] == 1
        Limiter(spool).suspend("example.net", 60, "421 4.7.0 slow down")
        assert scrape(server.port)["mxsend_suspended_destinations"] == 2
    finally:
        asyncio.run(server.close())
