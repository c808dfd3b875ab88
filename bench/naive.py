"""Naive peer: what one would write first, a ``transformers`` ``pipeline()`` per request in PyTorch
(text-classification, then token-classification with ``aggregation_strategy="simple"``), called from a
thread pool; against the sidecar's Engine (``classify`` and ``detect_pii`` per request, concurrent
requests on one event loop). Both serve the same texts in a closed loop at each concurrency; the result is
requests/s, latency, and the ratio ours/naive.

The naive peer runs the PyTorch weights (fp32 on CPU), the Engine what the sidecar itself picks (INT8
ONNX on CPU). Shipped model directories hold no PyTorch weights; they are looked up in the full build of
the same name (``--full-models``, default ``build/models``). A PII model joined by ``trainer ensemble`` is one
graph with no PyTorch weights of its own: the naive peer runs one token-classification pipeline per member
(the directories its ``eval_results.json`` names), one after the other, as many passes as the joined graph
makes in one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable like under `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DATA,
    DEFAULT_MODELS,
    FULL_MODELS,
    RESULTS,
    busy_processes,
    corpus_texts,
    ensemble_members,
    full_build_matches,
    full_model_file,
    log,
    machine,
    save_figure,
    write_json,
)

CONCURRENCY = [1, 8, 32]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--category", type=Path, default=DEFAULT_MODELS[0], help="category model directory")
    p.add_argument("--pii", type=Path, default=DEFAULT_MODELS[1], help="PII model directory")
    p.add_argument("--full-models", type=Path, default=FULL_MODELS,
                   help="folder with full builds of the same models (PyTorch weights for the naive peer)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="requests in flight, comma-separated")
    p.add_argument("--min-time", type=float, default=4.0, help="seconds each measurement runs at least")
    p.add_argument("--texts", type=int, default=128, help="distinct texts, served in turn")
    p.add_argument("--corpus", type=Path, nargs="*", default=[DATA / "category_val.jsonl"], help="JSONL files with the texts")
    p.add_argument("--pii-corpus", type=Path, nargs="*", default=[DATA / "synth_val.jsonl"],
                   help="JSONL files with PII texts, appended to every fourth text")
    p.add_argument("--out", type=Path, default=RESULTS / "naive.json")
    p.add_argument("--plot", default=str(RESULTS / "naive.png"), help="PNG to draw ('' for none)")
    return p.parse_args(argv)


def request_texts(n: int, corpus: list[str], pii_texts: list[str]) -> list[str]:
    """The user messages of ``bench/envoy.py``'s requests: questions, every fourth with personal data."""
    texts = []
    for i in range(n):
        text = corpus[(i * 7919) % len(corpus)][:2000]
        if i % 4 == 3 and pii_texts:
            text += " " + pii_texts[i % len(pii_texts)]
        texts.append(text)
    return texts


def closed_loop(serve_one, texts: list[str], concurrency: int, min_time_s: float) -> dict:
    """`concurrency` threads, each serving the next text as soon as its last one is done, for `min_time_s`."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**12))
    deadline = time.perf_counter() + min_time_s

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter)
            t0 = time.perf_counter()
            serve_one(texts[i % len(texts)])
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return _summary(latencies, time.perf_counter() - started)


def closed_loop_async(serve_one, texts: list[str], concurrency: int, min_time_s: float) -> dict:
    """The same closed loop as `concurrency` tasks on one event loop (how the sidecar's server calls the Engine)."""
    latencies: list[float] = []

    async def run() -> float:
        counter = iter(range(10**12))
        deadline = time.perf_counter() + min_time_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                i = next(counter)
                t0 = time.perf_counter()
                await serve_one(texts[i % len(texts)])
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started

    return _summary(latencies, asyncio.run(run()))


def _summary(latencies: list[float], seconds: float) -> dict:
    ms = np.asarray(latencies) * 1000.0
    return {"requests": len(latencies), "seconds": round(seconds, 3), "rps": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


class Naive:
    """A classification pipeline and the PII pipelines (one, or one per ensemble member), called one after the
    other for each request."""

    def __init__(self, category: Path, pii: Sequence[Path], device: str):
        from transformers import pipeline

        dev = 0 if device == "cuda" else -1
        self.classifier = pipeline("text-classification", model=str(category), device=dev)
        self.taggers = [pipeline("token-classification", model=str(d), aggregation_strategy="simple", device=dev)
                        for d in pii]

    def serve(self, text: str) -> tuple:
        return self.classifier(text, truncation=True)[0], [tag(text) for tag in self.taggers]


def pytorch_dirs(model_dir: Path, full_root: Path | None) -> list[Path] | None:
    """Where the naive peer finds `model_dir`'s PyTorch weights: its own (here or in the full build), or for an
    ensemble each member's; None when any is missing."""
    members = ensemble_members(model_dir)
    if members is None:
        weights = full_model_file(model_dir, "model.safetensors", full_root)
        return None if weights is None else [weights.parent]
    dirs = [m["dir"] for m in members]
    return dirs if all((d / "model.safetensors").is_file() for d in dirs) else None


def is_shipped(model_dir: Path, full_root: Path | None) -> bool | None:
    """Whether the PyTorch weights timed are the shipped model's: for an ensemble, whether every member's INT8
    file is still the one joined (retrained members are another build of the same recipe)."""
    members = ensemble_members(model_dir)
    return full_build_matches(model_dir, full_root) if members is None else all(m["joined"] for m in members)


class Ours:
    """The sidecar's Engine, both models, as the server runs them (checksums on)."""

    def __init__(self, category: Path, pii: Path, device: str):
        from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig
        from sidecar.inference.engine import Engine

        self.passes = {"category": 0, "pii": 0}
        models = ModelsConfig(category=ModelConfig(path=str(category), device=device),
                              pii=ModelConfig(path=str(pii), device=device))
        self.engine = Engine.load(models, BatchingConfig(), checksums=True, on_batch=self._count)
        self.describe = self.engine.describe()

    def _count(self, model: str, rows: int, tokens: int, ms: float) -> None:
        self.passes[model] += 1

    async def serve(self, text: str) -> tuple:
        return tuple(await asyncio.gather(self.engine.classify(text), self.engine.detect_pii(text)))


def agreement(naive: Naive, ours: Ours, texts: list[str]) -> dict:
    """How often the two agree on the category (fp32 PyTorch vs the served runtime), and the passes one
    request costs the Engine on its own."""
    same = 0
    ours.passes = {"category": 0, "pii": 0}
    for text in texts:
        category, _ = asyncio.run(ours.serve(text))
        same += naive.serve(text)[0]["label"] == category.label
    return {"texts": len(texts), "category_agreement": round(same / len(texts), 4),
            "passes_per_request": {k: round(v / len(texts), 3) for k, v in ours.passes.items()}}


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    xs = [r["concurrency"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ("naive", "ours"):
        ax1.plot(xs, [r[name]["rps"] for r in rows], "-o", label=name)
        line, = ax2.plot(xs, [r[name]["p50_ms"] for r in rows], "-o", label=f"{name} p50")
        ax2.plot(xs, [r[name]["p99_ms"] for r in rows], "--", color=line.get_color(), label=f"{name} p99")
    for x, r in zip(xs, rows, strict=True):
        ax1.annotate(f"x{r['ratio']:.1f}", (x, r["ours"]["rps"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("requests / s (category + PII)")
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    return save_figure(fig, path, "Engine vs transformers pipeline()", results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrency = [int(x) for x in args.concurrency.split(",")]
    weights = {name: pytorch_dirs(path, args.full_models) for name, path in (("category", args.category), ("pii", args.pii))}
    missing = [name for name, w in weights.items() if w is None]
    reason = (f"no PyTorch weights for {', '.join(missing)} (model.safetensors here, in --full-models or in each "
              f"ensemble member; `make models`)" if missing else
              "the category model is an ensemble; the naive peer classifies with one pipeline"
              if len(weights["category"]) > 1 else None)
    if reason:  # a fresh checkout ships INT8 ONNX only: say so in the results rather than fail `make bench`
        log(f"skipped: {reason}")
        write_json(args.out, {"bench": "naive", "machine": machine(args.device), "skipped": reason})
        return 0
    texts = request_texts(args.texts, corpus_texts(args.corpus), corpus_texts(args.pii_corpus, fallback=False))
    log("loading the naive pipelines and the engine")
    naive = Naive(weights["category"][0], weights["pii"], args.device)
    ours = Ours(args.category, args.pii, args.device)
    try:
        for text in texts[:4]:  # warm both up
            naive.serve(text)
            asyncio.run(ours.serve(text))
        check = agreement(naive, ours, texts[: min(len(texts), 32)])
        rows = []
        for c in concurrency:
            n = closed_loop(naive.serve, texts, c, args.min_time)
            o = closed_loop_async(ours.serve, texts, c, args.min_time)
            rows.append({"concurrency": c, "naive": n, "ours": o, "ratio": round(o["rps"] / n["rps"], 2)})
            log(f"  c={c:2d} naive {n['rps']:7.1f} req/s (p50 {n['p50_ms']:.1f} ms)   ours {o['rps']:7.1f} req/s "
                f"(p50 {o['p50_ms']:.1f} ms)   x{rows[-1]['ratio']}")
    finally:
        ours.engine.close()
    results = {
        "bench": "naive",
        "machine": machine(args.device),
        "contended": busy_processes(),
        "settings": {"concurrency": concurrency, "min_time_s": args.min_time, "texts": len(texts),
                     "mean_chars": round(statistics.mean(len(t) for t in texts), 1),
                     "naive": {"category": str(weights["category"][0]), "pii": [str(d) for d in weights["pii"]],
                               "how": "transformers.pipeline text-classification (truncation=True) + "
                                      "token-classification (aggregation_strategy=simple)"
                                      + (f", one per member of the PII ensemble ({len(weights['pii'])}), in turn"
                                         if len(weights["pii"]) > 1 else "") + ", PyTorch, thread pool"},
                     "ours": {k: {"runtime": v["runtime"], "file": v["file"]} for k, v in ours.describe.items() if v},
                     "full_build_is_shipped": {name: is_shipped(path, args.full_models)
                                               for name, path in (("category", args.category), ("pii", args.pii))}},
        "check": check,
        "rows": rows,
        "summary": {"ratio_by_concurrency": {r["concurrency"]: r["ratio"] for r in rows}},
    }
    write_json(args.out, results)
    log(f"wrote {args.out}")
    if args.plot:
        log(f"wrote {plot(results, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
