"""The sidecar's own Python per request, without gRPC, Envoy or models: what it costs to parse the two
ext_proc messages of a chat request (headers, then the buffered body), answer both through ``Stream``
(routing, policy, rewrite, metrics, the request log event) and serialize the answers.

Through Envoy this code shares the event loop with grpc.aio's own work, and on a shared VM its time
drifts with the neighbours; an instruction count does not. With ``--callgrind`` (Debian's valgrind) the
script runs itself twice under ``valgrind --tool=callgrind`` and reports instructions per request (the
difference between the two runs, so start-up cancels out): the same code gives the same count within a
few percent, whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable like under `python -m`, and keep
    # bench/envoy.py from shadowing Envoy's proto package `envoy` (the script's folder leads sys.path)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import DATA, RESULTS, corpus_texts, log, machine, write_json

ROOT = Path(__file__).resolve().parents[1]
HEADERS = [(":path", "/v1/chat/completions"), (":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1:8080"),
           ("user-agent", "wrk"), ("content-type", "application/json"), ("content-length", "465"),
           ("x-forwarded-proto", "http"), ("x-request-id", "6f1c7f0e-8d55-4f0c-9f5b-1c2d3e4f5a6b")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="requests timed per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--callgrind", action="store_true", help="also count instructions per request under valgrind")
    p.add_argument("--corpus", type=Path, nargs="*", default=[DATA / "category_val.jsonl"],
                   help="JSONL files the user messages are taken from (as bench/envoy.py builds them)")
    p.add_argument("--pii-corpus", type=Path, nargs="*", default=[DATA / "synth_val.jsonl"])
    p.add_argument("--out", type=Path, default=RESULTS / "request_path.json")
    p.add_argument("--loop-only", type=int, default=0, help=argparse.SUPPRESS)  # the run valgrind measures
    return p.parse_args(argv)


class RequestPath:
    """deploy/router.yaml without models (as bench/envoy.py's no-model case), driven message by message."""

    def __init__(self, bodies: list[str]):
        import yaml
        from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
        from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingRequest

        from bench.envoy import NO_MODELS
        from sidecar.app import build_app
        from sidecar.config import parse_config
        from sidecar.logs import configure_logging
        from sidecar.metrics import Metrics
        from sidecar_demo.configs import ROUTER_CONFIG, merge

        config = parse_config(merge(yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8")), NO_MODELS), ROUTER_CONFIG.parent)
        self._devnull = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the app
        configure_logging(config.logging, self._devnull)  # the request event is rendered and written, as in serving
        self.metrics = Metrics()
        self.app = build_app(config, self.metrics)
        headers = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in HEADERS])
        self._parse = ProcessingRequest.FromString
        self.headers = ProcessingRequest(request_headers=HttpHeaders(headers=headers)).SerializeToString()
        self.bodies = [ProcessingRequest(request_body=HttpBody(body=b.encode(), end_of_stream=True)).SerializeToString()
                       for b in bodies]

    async def one(self, i: int) -> None:
        from sidecar.processor import Stream

        stream = Stream(self.app, self.metrics)
        for wire in (self.headers, self.bodies[i % len(self.bodies)]):
            response = await stream.handle(self._parse(wire))
            response.SerializeToString()
        stream.close()

    async def many(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            await self.one(i)

    def close(self) -> None:
        self.app.close()
        self._devnull.close()


def timed(path: RequestPath, requests: int, rounds: int) -> dict:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(path.many(min(requests, 500)))  # warm-up
        per_request = []
        for _ in range(rounds):
            started = time.perf_counter()
            loop.run_until_complete(path.many(requests))
            per_request.append((time.perf_counter() - started) / requests * 1e6)
    finally:
        loop.close()
    return {"us_per_request": round(statistics.median(per_request), 1), "rounds_us": [round(x, 1) for x in per_request]}


def instructions(argv: list[str], few: int = 100, many: int = 600) -> dict | None:
    """Instructions per request: this script under callgrind for `many` and `few` requests, differenced."""
    if not shutil.which("valgrind"):
        return None
    counts = []
    for n in (few, many):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__, *argv,
             "--loop-only", str(n)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=False)
        m = re.search(r"Collected : (\d+)", out.stderr)
        if out.returncode != 0 or m is None:
            raise RuntimeError(f"callgrind run failed ({out.returncode}): {out.stderr.strip()[-400:]}")
        counts.append(int(m.group(1)))
    return {"instructions_per_request": round((counts[1] - counts[0]) / (many - few)), "runs": [few, many]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.envoy import request_bodies

    bodies = request_bodies(64, corpus_texts(args.corpus), corpus_texts(args.pii_corpus))
    path = RequestPath(bodies)
    try:
        if args.loop_only:
            asyncio.run(path.many(args.loop_only))
            return 0
        result = timed(path, args.requests, args.rounds)
    finally:
        path.close()
    log(f"request path: {result['us_per_request']} us per request (median of {args.rounds} rounds)")
    if args.callgrind:
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--callgrind"]
        result["callgrind"] = instructions(passthrough)
        if result["callgrind"]:
            log(f"request path: {result['callgrind']['instructions_per_request']:,} instructions per request")
        else:
            log("request path: valgrind is not installed (apt-get install valgrind); no instruction count")
    write_json(args.out, {"bench": "request_path", "machine": machine(), "requests": args.requests,
                          "request_bytes": round(statistics.mean(len(b.encode()) for b in bodies), 1), **result})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
