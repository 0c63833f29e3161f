#!/usr/bin/env python3
"""Per-message cost of traffic shaping (docs/shaping.md, "What it costs").

Not the full bench (scripts/bench): this times the calls the Deliverer makes per
message for its destination, in one process, with and without a shape and a Redis:

- none:   nothing configured, the Deliverer has no Shaper (one `is None` check);
- local:  one shape with a rate, decided by this daemon's limiter;
- redis:  the same shape decided by a real redis-server on loopback (batch reservation).

Usage: PYTHONPATH=. python scripts/measure_shaping.py [MESSAGES]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxsend.cluster import Cluster
from mxsend.config_shaping import ShapingConfig
from mxsend.shaper import Shaper
from mxsend.shaping import Shape, parse_rate
from tests.fixtures.redis_server import RedisServer

# The shaped destination: 1000 messages a second, across the cluster.
SHAPE = Shape(name="big", hosts=("*.big.example",), rate=parse_rate("1000/s", "rate"))


async def per_message(shaper: Shaper | None, count: int) -> float:
    """Seconds of deciding per message, with every message admitted (no waits)."""
    start = time.perf_counter()
    for i in range(count):
        if shaper is None:
            continue
        target = shaper.target("mx1.big.example", "big.example")
        await shaper.suspended_until(target)
        await shaper.admit_message(target, f"m{i}")
    return (time.perf_counter() - start) / count


async def steady(shaper: Shaper, seconds: float, demand: float) -> int:
    """Messages arrive at `demand` per second; each refused or booked one comes back
    at the time it was given, as the due plan brings it back. Returns those started."""
    started, pending, sequence = 0, [], 0
    end = time.time() + seconds
    while time.time() < end:
        await asyncio.sleep(1 / demand)
        now = time.time()
        due = [p for p in pending if p[0] <= now]
        pending = [p for p in pending if p[0] > now]
        sequence += 1
        for _, queue_id in [*due, (0.0, f"n{sequence}")]:
            target = shaper.target("mx1.big.example", "big.example")
            await shaper.suspended_until(target)
            at = await shaper.admit_message(target, queue_id)
            if at == 0.0:
                started += 1
            else:
                pending.append((at, queue_id))
    return started


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp)
        config = ShapingConfig(shapes=(SHAPE,))
        unlimited = ShapingConfig(shapes=(Shape(name="big", hosts=("*.big.example",),
                                                rate=parse_rate("1000000/s", "r")),))
        print(f"none:  {await per_message(None, count) * 1e6:8.2f} us/message decided")
        local = Shaper(unlimited, spool, processes=1, per_domain=10)
        print(f"local: {await per_message(local, count) * 1e6:8.2f} us/message decided")
        server = RedisServer(spool)
        server.start()
        try:
            cluster = Cluster(server.url)
            calls = 0
            original = cluster._call

            async def counted(request):  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                return await original(request)

            cluster._call = counted  # type: ignore[method-assign]
            shaped = Shaper(config, spool, processes=1, per_domain=10, cluster=cluster)
            for demand in (500.0, 2000.0):
                calls = 0
                started = await steady(shaped, 2.0, demand)
                print(f"redis, 1000/s shape, {demand:.0f}/s offered for 2 s: {started} "
                      f"started, {calls} round trips, "
                      f"{calls / max(1, started):.3f} round trips per message started")
            await shaped.close()
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
