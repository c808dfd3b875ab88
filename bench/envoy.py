"""Through Envoy: requests/s and p50/p99 latency of chat requests at several concurrencies, for
(a) Envoy straight to the mock backends (no ext_proc filter), (b) Envoy + the sidecar with no models
(parse, route to the default, no inference, checksums off) and (c) Envoy + the sidecar with the models.
(b) - (a) is the protocol's own cost; (c) - (b) is inference, set against the single-request ONNX Runtime
floor of the same request mix (measured here after the runs).

Every case is the shipped stack (``sidecar_demo.stack``: deploy/envoy.yaml on loopback ports, the sidecar
from deploy/router.yaml, one mock backend per cluster), driven by ``wrk`` (closed loop: each connection
sends its next request when the last answer arrived), or by ``bench/loadgen.py`` in its own process when
wrk is not installed. The three stacks run side by side and are measured in turns at each concurrency.
Everything shares this machine's cores, load generator included; the CPU time each process spent per
request is recorded so that the sharing is visible.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable like under `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DATA,
    DEFAULT_MODELS,
    RESULTS,
    busy_processes,
    corpus_texts,
    log,
    machine,
    save_figure,
    write_json,
)

CONCURRENCY = [1, 8, 32, 64]
NO_MODELS = {"models": {"category": None, "pii": None}, "pii": {"checksums": False}}
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and cite your sources."
CASES = {
    "direct": "(a) Envoy -> mock backend, no ext_proc",
    "noop": "(b) Envoy + sidecar, no models",
    "models": "(c) Envoy + sidecar, category + PII models",
}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--category", type=Path, default=DEFAULT_MODELS[0], help="category model directory")
    p.add_argument("--pii", type=Path, default=DEFAULT_MODELS[1], help="PII model directory")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="models.*.device for case (c)")
    p.add_argument("--threads", type=int, default=0, help="models.*.threads for case (c) (0: the runtime's default)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {', '.join(CASES)}")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="open connections, comma-separated")
    p.add_argument("--duration", type=int, default=4, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements per case and concurrency, taken in turns; each row reports their median")
    p.add_argument("--warmup", type=int, default=2, help="seconds of load before the first measurement of a case")
    p.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (0: one per core)")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                   help="wrk when installed (auto), else bench/loadgen.py")
    p.add_argument("--requests", type=int, default=64, help="distinct request bodies, sent in turn")
    p.add_argument("--corpus", type=Path, nargs="*", default=[DATA / "category_val.jsonl"],
                   help="JSONL files the user messages are taken from")
    p.add_argument("--pii-corpus", type=Path, nargs="*", default=[DATA / "synth_val.jsonl"],
                   help="JSONL files with PII texts, appended to every fourth message")
    p.add_argument("--out", type=Path, default=RESULTS / "envoy.json")
    p.add_argument("--plot", default=str(RESULTS / "envoy.png"), help="PNG to draw ('' for none)")
    return p.parse_args(argv)


# --- requests --------------------------------------------------------------------------------------


def request_bodies(n: int, corpus: list[str], pii_texts: list[str], seed: int = 0) -> list[str]:
    """Chat requests as a client sends them: a system prompt and one user question; every fourth question
    carries personal data, so the PII model finds something to mask."""
    rng = random.Random(seed)
    questions = rng.sample(corpus, min(n, len(corpus))) if len(corpus) >= n else [corpus[i % len(corpus)] for i in range(n)]
    bodies = []
    for i, question in enumerate(questions):
        text = question[:2000]
        if i % 4 == 3 and pii_texts:
            text += " " + pii_texts[i % len(pii_texts)]
        bodies.append(json.dumps({"model": "auto", "messages": [
            {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]}, ensure_ascii=False))
    return bodies


# --- load generators -------------------------------------------------------------------------------


def wrk_script(bodies: list[str], path: str, out: Path) -> Path:
    """A wrk Lua script that posts `bodies` in turn and prints a JSON summary line at the end."""
    def long_string(text: str) -> str:
        level = 1
        while f"]{'=' * level}]" in text:
            level += 1
        return f"[{'=' * level}[{text}]{'=' * level}]"

    lua = [
        "local bodies = {" + ",\n".join(long_string(b) for b in bodies) + "}",
        "local i = 0",
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        "request = function()",
        "  i = i % #bodies + 1",
        f'  return wrk.format(nil, "{path}", nil, bodies[i])',
        "end",
        "done = function(summary, latency, requests)",
        "  local e = summary.errors",
        "  io.write(string.format('{\"requests\": %d, \"duration_us\": %d, \"errors\": {\"connect\": %d, "
        "\"read\": %d, \"write\": %d, \"status\": %d, \"timeout\": %d}, \"latency_us\": {\"p50\": %.1f, "
        "\"p90\": %.1f, \"p99\": %.1f, \"mean\": %.1f, \"max\": %.1f}}\\n', summary.requests, summary.duration, "
        "e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90), "
        "latency:percentile(99), latency.mean, latency.max))",
        "end",
    ]
    out.write_text("\n".join(lua) + "\n", encoding="utf-8")
    return out


class LoadGenerator:
    """wrk or bench/loadgen.py, started as a child process per measurement."""

    def __init__(self, kind: str, bodies: list[str], path: str, workdir: Path):
        if kind == "auto":
            kind = "wrk" if shutil.which("wrk") else "python"
        if kind == "wrk" and not shutil.which("wrk"):
            raise SystemExit("wrk is not installed (apt-get install wrk), or use --loadgen python")
        self.kind = kind
        self.path = path
        if kind == "wrk":
            self.script = wrk_script(bodies, path, workdir / "bodies.lua")
        else:
            self.script = workdir / "bodies.json"
            self.script.write_text(json.dumps(bodies), encoding="utf-8")

    def run(self, base_url: str, connections: int, duration_s: int) -> dict:
        """The load generator's summary and the CPU seconds it used."""
        url = base_url + self.path
        if self.kind == "wrk":
            argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s", "--latency",
                    "-s", str(self.script), base_url]
        else:
            argv = [sys.executable, str(Path(__file__).with_name("loadgen.py")), url, "--bodies", str(self.script),
                    "--connections", str(connections), "--duration", str(duration_s)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        line = next((x for x in out.stdout.splitlines() if x.startswith('{"requests"')), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"{self.kind} failed ({out.returncode}): {out.stderr.strip()[-500:] or out.stdout[-500:]}")
        summary = json.loads(line)
        summary["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return summary


# --- observations ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_cpu(stack) -> dict[str, float]:
    """CPU seconds so far per kind of process: envoy, sidecar, mocks (all backends together)."""
    out: dict[str, float] = {}
    for name, pid in stack.processes().items():
        kind = "mocks" if name.startswith("mock") else name
        out[kind] = out.get(kind, 0.0) + cpu_seconds(pid)
    return out


_METRIC = re.compile(r'^(sidecar_[a-z_]+?)(?:\{([^}]*)\})? ([0-9.e+-]+|NaN)$')


def scrape(url: str) -> dict[str, float]:
    """The sidecar's Prometheus counters as ``name{labels}`` -> value."""
    from sidecar_demo.stack import http

    status, body = http("GET", url + "/metrics")
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.decode().splitlines():
        m = _METRIC.match(line)
        if m:
            out[f"{m.group(1)}{{{m.group(2) or ''}}}"] = float(m.group(3))
    return out


def sidecar_view(before: dict[str, float], after: dict[str, float], requests: int) -> dict:
    """Forward passes and windows per model over one measurement, and the decisions' actions."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    out: dict = {}
    for model in ("category", "pii"):
        passes = delta(f'sidecar_batch_size_count{{model="{model}"}}')
        windows = delta(f'sidecar_batch_size_sum{{model="{model}"}}')
        busy = delta(f'sidecar_inference_seconds_sum{{model="{model}"}}')
        if passes:
            out[model] = {"passes": int(passes), "windows": int(windows), "mean_batch": round(windows / passes, 2),
                          "passes_per_request": round(passes / max(requests, 1), 3),
                          "model_busy_s": round(busy, 3)}
    actions: dict[str, int] = {}
    for key in after:
        if key.startswith("sidecar_requests_total{"):
            action = re.search(r'action="([^"]*)"', key)
            if action and delta(key):
                actions[action.group(1)] = actions.get(action.group(1), 0) + int(delta(key))
    out["actions"] = actions
    errors = {k: int(delta(k)) for k in after if k.startswith("sidecar_request_errors_total") and delta(k)}
    if errors:
        out["errors"] = errors
    return out


def routed(stack, before: dict[str, int]) -> dict[str, int]:
    """Requests each backend cluster answered since `before`."""
    now = upstream_counts(stack)
    return {k: now[k] - before.get(k, 0) for k in now if now[k] - before.get(k, 0)}


def upstream_counts(stack) -> dict[str, int]:
    stats = stack.envoy_stats("cluster.")
    return {name: stats.get(f"cluster.{name}.upstream_rq_completed", 0) for name in stack.layout.backend_clusters}


# --- a case ----------------------------------------------------------------------------------------


def stack_for(case: str, args: argparse.Namespace):
    from sidecar_demo.stack import Stack

    common = {"envoy_concurrency": args.envoy_concurrency or None, "envoy_log_level": "error"}
    if case == "direct":
        return Stack(ext_proc=False, router_overrides=NO_MODELS, **common)
    if case == "noop":
        return Stack(router_overrides=NO_MODELS, **common)
    models = {name: {"path": str(path.resolve()), "device": args.device, "threads": args.threads}
              for name, path in (("category", args.category), ("pii", args.pii))}
    return Stack(router_overrides={"models": models}, **common)


def measure(case: str, stack, load: LoadGenerator, c: int, duration_s: int) -> dict:
    """One closed-loop run at `c` connections, with each process's CPU time and the sidecar's counters."""
    stack.clear_received()  # the mocks keep every request; do not let that grow across runs
    cpu0, metrics0, up0 = process_cpu(stack), scrape(stack.metrics_url) if stack.ext_proc else {}, upstream_counts(stack)
    result = load.run(stack.url, c, duration_s)
    cpu1, metrics1 = process_cpu(stack), scrape(stack.metrics_url) if stack.ext_proc else {}
    n = result["requests"]
    seconds = result["duration_us"] / 1e6
    lat = result["latency_us"]
    errors = sum(v for k, v in result["errors"].items() if k != "status")  # status: answers >= 400 (blocks)
    cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    cpu["loadgen"] = result["cpu_s"]
    row = {
        "case": case, "concurrency": c, "requests": n, "seconds": round(seconds, 2),
        "rps": round(n / seconds, 1), "errors": errors, "non_2xx": result["errors"]["status"],
        "error_detail": result["errors"],
        "p50_ms": round(lat["p50"] / 1000, 3), "p90_ms": round(lat["p90"] / 1000, 3),
        "p99_ms": round(lat["p99"] / 1000, 3), "mean_ms": round(lat["mean"] / 1000, 3),
        "max_ms": round(lat["max"] / 1000, 3),
        "cpu_ms_per_request": {k: round(1000 * v / max(n, 1), 3) for k, v in sorted(cpu.items())},
        "cpu_utilisation": round(sum(cpu.values()) / seconds, 2),
        "backends": routed(stack, up0),
    }
    if stack.ext_proc:
        row["sidecar"] = sidecar_view(metrics0, metrics1, n)
        # Requests answered without running the models (the failure timeout ran out) are not inference.
        degraded = row["sidecar"]["actions"].get("degraded", 0)
        row["inferred_rps"] = round((n - degraded) / seconds, 1)
    log(f"  {case:6s} c={c:2d} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
        f"  errors {errors}  cpu {row['cpu_ms_per_request']}")
    return row


def run_cases(cases: list[str], args: argparse.Namespace, bodies: list[str], concurrency: list[int],
              workdir: Path) -> dict[str, dict]:
    """All cases' stacks up at once, measured in turns at each concurrency: the differences between cases
    are then taken within a minute of each other, not across the drift of a shared machine. An idle stack
    costs next to nothing (health checks every few seconds)."""
    from sidecar_demo.stack import http

    path = "/v1/chat/completions"
    load = LoadGenerator(args.loadgen, bodies, path, workdir)
    out: dict[str, dict] = {}
    with contextlib.ExitStack() as running:
        stacks = {}
        for case in cases:
            started = time.perf_counter()
            stacks[case] = running.enter_context(stack_for(case, args))
            out[case] = {"case": case, "description": CASES[case], "loadgen": load.kind, "rows": [],
                         "startup_s": round(time.perf_counter() - started, 2)}
            status, _ = http("POST", stacks[case].url + path, bodies[0].encode(), timeout=30)
            if status != 200:
                raise RuntimeError(f"{case}: a first request answered {status}")
        for stack in stacks.values():
            if args.warmup:
                load.run(stack.url, max(concurrency), args.warmup)
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.rounds):
            for c in concurrency:
                for case, stack in stacks.items():
                    runs.setdefault((case, c), []).append(measure(case, stack, load, c, args.duration))
        for (case, _), measured in runs.items():
            out[case]["rows"].append(median_row(measured))
    return out


def median_row(runs: list[dict]) -> dict:
    """One row for several runs of the same point: the run with the median p50 latency (its rate, p99 and
    CPU figures belong together), with every run's rate and p50 kept beside it. On a shared VM one run in
    several lands on a slow moment; the median is what the machine usually gives."""
    ordered = sorted(runs, key=lambda r: r["p50_ms"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs"] = [{"rps": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]} for r in runs]
    return row


# --- the single-request floor of the same mix ------------------------------------------------------


def request_floor(bodies: list[str], category: Path, pii: Path, device: str) -> dict:
    """ONNX Runtime time per request, one text at a time, for exactly what the sidecar runs on this mix:
    the category model on the latest user message's first window, the PII model on every window of the
    system and user messages."""
    from model_contract.model_dir import ModelDir
    from sidecar.config import ModelConfig
    from sidecar.inference.backends import open_backend
    from sidecar.inference.windows import TextEncoder

    out: dict = {"requests": len(bodies)}
    total = np.zeros(len(bodies))
    for name, path in (("category", category), ("pii", pii)):
        md = ModelDir.read(path)
        backend = open_backend(md, ModelConfig(path=str(path), device=device))  # the sidecar's sessions, alone
        if not backend.file.endswith(".onnx"):
            return {"skipped": f"{name}: not an ONNX model"}
        encoder = TextEncoder.for_model(md, 512, 64)
        inputs = []
        for body in bodies:
            messages = json.loads(body)["messages"]
            if name == "category":
                inputs.append([encoder.head_of(messages[-1]["content"])])
            else:
                inputs.append([w.ids for m in messages for w in encoder.windows(encoder.encode(m["content"]))])
        per = np.zeros(len(bodies))
        for _ in range(2):  # the first round warms the runtime up
            for i, rows in enumerate(inputs):
                t0 = time.perf_counter()
                for ids in rows:
                    backend.run(ids[None, :], np.ones((1, len(ids)), dtype=np.int64))
                per[i] = (time.perf_counter() - t0) * 1000.0
        total += per
        out[name] = {"runtime": backend.name, "mean_ms": round(float(per.mean()), 3),
                     "mean_tokens": round(float(np.mean([sum(len(r) for r in rows) for rows in inputs])), 1),
                     "windows_per_request": round(float(np.mean([len(rows) for rows in inputs])), 2)}
    out["both_mean_ms"] = round(float(total.mean()), 3)
    return out


# --- report ----------------------------------------------------------------------------------------


def summarize(cases: dict[str, dict], floor: dict) -> dict:
    by = {(name, r["concurrency"]): r for name, case in cases.items() for r in case["rows"]}
    out: dict = {"per_concurrency": {}}
    for c in sorted({c for _, c in by}):
        d, n, m = by.get(("direct", c)), by.get(("noop", c)), by.get(("models", c))
        entry: dict = {}
        if d and n:
            entry["protocol_overhead_p50_ms"] = round(n["p50_ms"] - d["p50_ms"], 3)
            entry["protocol_overhead_p99_ms"] = round(n["p99_ms"] - d["p99_ms"], 3)
        if n and m:
            entry["inference_p50_ms"] = round(m["p50_ms"] - n["p50_ms"], 3)
        for name, row in (("direct", d), ("noop", n), ("models", m)):
            if row:
                entry[f"{name}_rps"] = row["rps"]
        out["per_concurrency"][c] = entry
    noop = [r["rps"] for (name, _), r in by.items() if name == "noop"]
    if noop:
        out["noop_peak_rps"] = max(noop)
    models = [r["rps"] for (name, _), r in by.items() if name == "models"]
    if models:
        out["models_peak_rps"] = max(models)
        out["models_peak_inferred_rps"] = max(r.get("inferred_rps", 0) for (name, _), r in by.items() if name == "models")
    if "both_mean_ms" in floor:
        out["inference_floor_ms"] = floor["both_mean_ms"]
    return out


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, case in results["cases"].items():
        xs = [r["concurrency"] for r in case["rows"]]
        ax1.plot(xs, [r["rps"] for r in case["rows"]], "-o", label=case["description"])
        line, = ax2.plot(xs, [r["p50_ms"] for r in case["rows"]], "-o", label=f"{name} p50")
        ax2.plot(xs, [r["p99_ms"] for r in case["rows"]], "--", color=line.get_color(), label=f"{name} p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("requests / s")
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, "Through Envoy; load generator, Envoy, sidecar and mocks share the cores", results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
    concurrency = [int(x) for x in args.concurrency.split(",")]
    bodies = request_bodies(args.requests, corpus_texts(args.corpus), corpus_texts(args.pii_corpus, fallback=False))
    results: dict = {
        "bench": "envoy",
        "machine": machine("cuda" if args.device == "cuda" else "cpu"),
        "contended": busy_processes(),
        "settings": {"concurrency": concurrency, "duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup,
                     "envoy_concurrency": args.envoy_concurrency, "requests": len(bodies), "threads": args.threads,
                     "mean_body_bytes": round(float(np.mean([len(b.encode()) for b in bodies])), 1),
                     "category": str(args.category), "pii": str(args.pii), "device": args.device,
                     "config": "deploy/envoy.yaml and deploy/router.yaml as shipped (addresses rewritten)"},
        "cases": {},
    }
    log("; ".join(CASES[c] for c in cases))
    with tempfile.TemporaryDirectory(prefix="bench-envoy-") as tmp:
        results["cases"] = run_cases(cases, args, bodies, concurrency, Path(tmp))
    results["settings"]["loadgen"] = next(iter(results["cases"].values()))["loadgen"] if cases else None
    results["request_floor"] = request_floor(bodies, args.category, args.pii, args.device) if "models" in cases else {}
    results["summary"] = summarize(results["cases"], results["request_floor"])
    write_json(args.out, results)
    log(f"wrote {args.out}")
    if args.plot:
        log(f"wrote {plot(results, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
