"""Did a change move the sidecar's own cost? The same two measurements of an earlier commit and of this tree,
on one host, in turns, so that a slower or noisier host moves both alike:

- `bench/request_path.py --callgrind`: instructions per request in the sidecar's own Python (no gRPC, Envoy
  or models), which hardly drift with the host;
- `bench/envoy.py --cases direct,noop`: Envoy alone and Envoy + the sidecar without models, through wrk when
  installed, at 1 and 32 connections: the protocol overhead and the no-model rate.

Only code that needs no models is compared, so a change of the bundled models moves nothing here. The earlier
commit is checked out into a temporary git worktree and run with this tree's virtual environment.

    .venv/bin/python bench/ab.py ed777b5 [--rounds 2] [--out bench/results/ab.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path[0] = str(ROOT)

from bench.common import DATA, RESULTS, machine, write_json  # noqa: E402


def run_in(tree: Path, script: str, args: list[str], out: Path) -> dict:
    """`script` of `tree` with this interpreter; the tree's own packages first, for its child processes too."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(tree / "bench" / script), *args, "--out", str(out)], cwd=tree, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text(encoding="utf-8"))


def inputs() -> list[str]:
    """The texts both sides cut their requests from, as this tree's files: each tree's scripts would
    otherwise look under their own checkout, and a fresh worktree has no build/ there, so the earlier commit
    got the built-in prose while this tree got exam questions with PII in half the requests (recognizer
    hits, masking, rewritten bodies) and looked slower for work it was given, not for its code."""
    return ["--corpus", str(DATA / "category_val.jsonl"), "--pii-corpus", str(DATA / "synth_val.jsonl")]


def measure(tree: Path, scratch: Path, name: str) -> dict:
    path = run_in(tree, "request_path.py", ["--callgrind", *inputs()], scratch / f"{name}-path.json")
    envoy = run_in(tree, "envoy.py", ["--cases", "direct,noop", "--concurrency", "1,32", "--plot", "", *inputs()],
                   scratch / f"{name}-envoy.json")
    per = envoy["summary"]["per_concurrency"]
    return {"instructions_per_request": (path.get("callgrind") or {}).get("instructions_per_request"),
            "us_per_request": path.get("us_per_request"),
            "protocol_overhead_p50_ms_1": per["1"]["protocol_overhead_p50_ms"],
            "direct_rps_1": per["1"]["direct_rps"], "noop_rps_1": per["1"]["noop_rps"],
            "noop_peak_rps": envoy["summary"]["noop_peak_rps"], "loadgen": envoy["settings"].get("loadgen")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=4, help="turns of both, first one first, then the other")
    parser.add_argument("--out", type=Path, default=RESULTS / "ab.json")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="sidecar-ab-") as tmp:
        scratch, tree = Path(tmp), Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for i in range(args.rounds):
                # The order alternates, so a host that drifts one way over a round favours neither side.
                sides = [("before", tree), ("after", ROOT)]
                for side, where in sides if i % 2 == 0 else reversed(sides):
                    runs[side].append(measure(where, scratch, f"{side}{i}"))
                print(f"round {i + 1}: before {runs['before'][-1]}\n         after  {runs['after'][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    result = {"bench": "ab", "machine": machine(), "before": commit, "after": f"{head} (+ working tree)",
              "inputs": [str(Path(p).relative_to(ROOT)) if Path(p).is_relative_to(ROOT) else p for p in inputs()],
              "runs": runs}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
