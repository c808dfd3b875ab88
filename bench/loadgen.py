"""A closed-loop HTTP load generator, for machines without ``wrk``: N connections, each sending its next
request as soon as the last answer arrived, for a fixed time. Prints one JSON line in the shape that
``bench/envoy.py`` reads from wrk.

It runs in its own process (``bench/envoy.py`` starts it), so it never shares an event loop or a GIL with
anything it measures; it does share the CPU, and costs far more of it per request than wrk does.

    python bench/loadgen.py URL --bodies bodies.json --connections 8 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


async def run(url: str, bodies: list[bytes], connections: int, duration_s: float, timeout_s: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    deadline = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    headers = {"content-type": "application/json"}
    client_timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def worker(k: int, session: aiohttp.ClientSession) -> None:
        i = k
        while time.perf_counter() < deadline:
            body = bodies[i % len(bodies)]
            i += connections
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status >= 400:
                        errors["status"] += 1
            except TimeoutError:
                errors["timeout"] += 1
                continue
            except aiohttp.ClientConnectionError:
                errors["connect"] += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.gather(*(worker(k, session) for k in range(connections)))
    elapsed = time.perf_counter() - started
    us = np.asarray(latencies) * 1e6 if latencies else np.zeros(1)
    return {
        "requests": len(latencies) + errors["status"],
        "duration_us": int(elapsed * 1e6),
        "errors": errors,
        "latency_us": {"p50": float(np.percentile(us, 50)), "p90": float(np.percentile(us, 90)),
                       "p99": float(np.percentile(us, 99)), "mean": float(us.mean()), "max": float(us.max())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--bodies", type=Path, required=True, help="JSON list of request bodies (strings), sent in turn")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="seconds")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    args = p.parse_args(argv)
    bodies = [b.encode() for b in json.loads(args.bodies.read_text(encoding="utf-8"))]
    print(json.dumps(asyncio.run(run(args.url, bodies, args.connections, args.duration, args.timeout))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
