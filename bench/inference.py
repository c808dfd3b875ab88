"""Inference floor: one forward pass through ONNX Runtime (and PyTorch) against the sidecar's Engine.

For each model directory and each (sequence length, batch size), the floor is one ``session.run`` on
``[batch, length]`` token ids, with the session options the sidecar uses; the Engine serves ``batch``
concurrent requests whose texts tokenize to exactly ``length`` tokens (CLS and SEP included), so
tokenization, batching, decoding and checksums are all in its time. Also: fp32 against INT8 ONNX and
PyTorch, how many forward passes each Engine call cost, how much padding the batch planner adds on real
text lengths, and INT8 against fp32 accuracy on the validation split.

Shipped model directories hold only ``model.int8.onnx``; the fp32 file and the PyTorch weights are looked
up in the full build of the same name (``--full-models``, default ``build/models``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

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
    full_build_matches,
    full_model_file,
    interleaved,
    log,
    machine,
    save_figure,
    texts_of_length,
    write_json,
)
from model_contract.tasks import get_task  # noqa: E402
from sidecar.config import ModelConfig

LENGTHS = [16, 32, 64, 128, 256, 512]
BATCHES = [1, 8, 32]
CATEGORY_DATA = [DATA / "category_val.jsonl"]
PII_DATA = [DATA / "presidio_val.jsonl", DATA / "synth_val.jsonl"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, default=DEFAULT_MODELS, help="model directories (default: models/category models/pii)")
    p.add_argument("--full-models", type=Path, default=FULL_MODELS,
                   help="folder with full builds of the same models, for files a shipped directory leaves out")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--runtimes", default=None,
                   help="floors to time, comma-separated from onnx-int8, onnx, onnx-fp16 (CUDA), torch "
                        "(default: onnx-int8,onnx,torch on CPU; onnx,onnx-fp16,torch on CUDA)")
    p.add_argument("--engine-runtime", default="auto", help="runtime the Engine serves with (default: the sidecar's own choice)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="tokens per sequence, CLS/SEP included")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="sequences per pass / concurrent requests")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtime's default)")
    p.add_argument("--small-pass-tokens", type=int, default=ModelConfig.model_fields["small_pass_tokens"].default,
                   help="models.*.small_pass_tokens for the Engine and the ONNX floors (0: off)")
    p.add_argument("--min-time", type=float, default=0.25,
                   help="seconds each runtime and the engine are timed per (length, batch), in three interleaved rounds")
    p.add_argument("--min-reps", type=int, default=3, help="runs each measurement takes at least")
    p.add_argument("--corpus", type=Path, nargs="*", default=CATEGORY_DATA + PII_DATA,
                   help="JSONL files the timed texts are cut from (built-in prose when none exists)")
    p.add_argument("--category-data", type=Path, nargs="*", default=CATEGORY_DATA, help="labelled data for the accuracy check")
    p.add_argument("--pii-data", type=Path, nargs="*", default=PII_DATA, help="span data for the accuracy check")
    p.add_argument("--no-accuracy", action="store_true", help="skip the INT8-vs-fp32 accuracy check")
    p.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    p.add_argument("--plot", default=str(RESULTS / "inference.png"), help="PNG to draw ('' for none)")
    return p.parse_args(argv)


# --- floors ----------------------------------------------------------------------------------------


def ort_session(path: Path, cuda: bool, threads: int):
    """A session built like ``sidecar.inference.backends.OnnxBackend`` builds it, so that the ratio
    against the Engine measures our Python, not different runtime settings."""
    import onnxruntime as ort

    from sidecar.inference.backends import session_options

    options = session_options(threads)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def fp16_copy(path: Path, workdir: Path) -> Path:
    """``model.onnx`` with fp16 weights and fp32 inputs/outputs, for the CUDA floor."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    out = workdir / f"{path.parent.name}.fp16.onnx"
    onnx.save_model(model, str(out))
    return out


def floor_runner(runtime: str, model_dir: Path, task: str, full_root: Path | None, device: str, threads: int,
                 workdir: Path, small_pass_tokens: int = 0):
    """(run(ids, mask) -> logits, file) for one runtime, or (None, why) when it cannot be had. An ONNX
    floor is the sidecar's own OnnxBackend called directly: the same sessions (a one-thread session for
    passes of at most `small_pass_tokens` tokens) and nothing else around ``session.run``."""
    cuda = device == "cuda"
    if runtime in ("onnx-int8", "onnx", "onnx-fp16"):
        path = full_model_file(model_dir, "model.int8.onnx" if runtime == "onnx-int8" else "model.onnx", full_root)
        if path is None:
            return None, f"no {'model.int8.onnx' if runtime == 'onnx-int8' else 'model.onnx'} here or in --full-models"
        if runtime == "onnx-fp16":
            path = fp16_copy(path, workdir)
        from sidecar.inference.backends import OnnxBackend

        return OnnxBackend(path, runtime, cuda, threads, small_pass_tokens).run, str(path)
    if runtime == "torch":
        weights = full_model_file(model_dir, "model.safetensors", full_root)
        if weights is None:
            return None, "no model.safetensors here or in --full-models"
        import torch
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        if threads > 0:
            torch.set_num_threads(threads)
        auto = AutoModelForSequenceClassification if get_task(task).head == "sequence" else AutoModelForTokenClassification
        dev = torch.device("cuda" if cuda else "cpu")
        model = auto.from_pretrained(weights.parent, dtype=torch.float16 if cuda else torch.float32).to(dev).eval()

        def run_torch(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = model(input_ids=torch.from_numpy(ids).to(dev), attention_mask=torch.from_numpy(mask).to(dev))
                return out.logits.float().cpu().numpy()

        return run_torch, str(weights)
    raise SystemExit(f"unknown runtime {runtime!r}")


# --- the engine ------------------------------------------------------------------------------------


class EngineRunner:
    """One model in a sidecar Engine, driven from its own event loop; counts forward passes."""

    def __init__(self, model_dir: Path, task: str, runtime: str, device: str, threads: int, small_pass_tokens: int):
        from sidecar.config import BatchingConfig, ModelsConfig
        from sidecar.inference.engine import Engine

        self.passes = 0
        config = ModelConfig(path=str(model_dir), runtime=runtime, device=device, threads=threads,
                             small_pass_tokens=small_pass_tokens)
        models = ModelsConfig(category=config) if task == "category" else ModelsConfig(pii=config)
        self.engine = Engine.load(models, BatchingConfig(), checksums=True, on_batch=self._count)
        self.describe = self.engine.describe()[task]
        self.call = self.engine.classify if task == "category" else self.engine.detect_pii
        self.loop = asyncio.new_event_loop()

    def _count(self, model: str, rows: int, tokens: int, ms: float) -> None:
        self.passes += 1

    def serve(self, texts: list[str]) -> list:
        async def together():
            return await asyncio.gather(*(self.call(t) for t in texts))

        return self.loop.run_until_complete(together())

    def close(self) -> None:
        self.engine.close()
        self.loop.close()


# --- measurements ----------------------------------------------------------------------------------


def bench_model(model_dir: Path, args: argparse.Namespace, runtimes: list[str], lengths: list[int],
                batches: list[int], corpus: list[str], workdir: Path) -> dict:
    from model_contract.model_dir import ModelDir

    md = ModelDir.read(model_dir)
    tokenizer = md.load_tokenizer()
    tokenizer.no_padding()
    tokenizer.no_truncation()
    limit = md.max_position_embeddings
    lengths = [n for n in lengths if n <= limit]
    # One-line texts: the floor runs exactly the whole text's windows, and so does the Engine on one line
    # (a multi-line text is read line by line as well: bench/line_windows.py times that extra reading).
    one_line = [" ".join(t.split("\n")) for t in corpus]
    texts = {n: texts_of_length(tokenizer, one_line, n - 2, max(batches)) for n in lengths}
    ids = {n: np.array([[md.cls_token_id, *tokenizer.encode(t, add_special_tokens=False).ids, md.sep_token_id]
                        for t in texts[n]], dtype=np.int64) for n in lengths}
    assert all(a.shape == (max(batches), n) for n, a in ids.items())
    runners: dict[str, object] = {}
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for runtime in runtimes:
        run, file = floor_runner(runtime, md.path, md.task, args.full_models, args.device, args.threads, workdir,
                                 args.small_pass_tokens)
        if run is None:
            skipped[runtime] = file
            log(f"  {runtime}: skipped ({file})")
            continue
        runners[runtime], files[runtime] = run, file

    runner = EngineRunner(md.path, md.task, args.engine_runtime, args.device, args.threads, args.small_pass_tokens)
    engine_runtime = runner.describe["runtime"]
    rows: list[dict] = []
    try:
        for n in lengths:
            for b in batches:
                x = np.ascontiguousarray(ids[n][:b])
                mask = np.ones_like(x)
                batch = texts[n][:b]
                fns = {rt: (lambda run=run, x=x, mask=mask: run(x, mask)) for rt, run in runners.items()}
                fns["engine"] = lambda batch=batch: runner.serve(batch)
                runner.passes = 0
                timed = interleaved(fns, args.min_time, args.min_reps)
                for rt in runners:
                    t = timed[rt]
                    rows.append({"path": "floor", "runtime": rt, "length": n, "batch": b, **t,
                                 "sequences_per_s": round(b / t["median_ms"] * 1000.0, 1)})
                t = timed["engine"]
                floor = timed.get(engine_runtime)
                ratio = round(t["median_ms"] / floor["median_ms"], 3) if floor else None
                passes = runner.passes / t["calls"]  # timed and untimed calls
                rows.append({"path": "engine", "runtime": engine_runtime, "length": n, "batch": b, **t,
                             "sequences_per_s": round(b / t["median_ms"] * 1000.0, 1),
                             "passes_per_call": round(passes, 2), "ratio_to_floor": ratio})
                log(f"  L={n:3d} B={b:2d} " + "  ".join(f"{rt} {timed[rt]['median_ms']:.2f}" for rt in runners)
                    + f"  engine {t['median_ms']:.2f} ms  x{ratio}  passes/call {passes:.2f}")
        single = single_request_passes(runner, corpus)
    finally:
        runner.close()
    return {
        "model": str(md.path),
        "full_build_is_shipped": full_build_matches(md.path, args.full_models),
        "task": md.task,
        "labels": len(md.labels),
        "architecture": _architecture(md.path),
        "files": files,
        "skipped": skipped,
        "engine": runner.describe,
        "rows": rows,
        "single_request_passes": single,
        "padding": padding_overhead(tokenizer, corpus, md.max_position_embeddings),
    }


def single_request_passes(runner: EngineRunner, corpus: list[str]) -> dict:
    """Forward passes one request costs on its own (a text of each corpus size class), to check that a
    request never pays more than one pass per model while its text fits one window."""
    out = {}
    for name, text in (("short", corpus[0][:200]), ("typical", " ".join(corpus[:3])[:1500])):
        runner.passes = 0
        runner.serve([text])
        out[name] = {"chars": len(text), "passes": runner.passes}
    return out


def padding_overhead(tokenizer, corpus: list[str], limit: int, arrivals: int = 32) -> dict:
    """Padded tokens per real token when the corpus arrives in groups of `arrivals` requests: our
    length-sorted plan against padding each group to its longest row."""
    from sidecar.config import BatchingConfig
    from sidecar.inference.batcher import pass_cost, plan_batches

    config = BatchingConfig()
    cost = pass_cost(["CPUExecutionProvider"])
    lengths = [min(len(e.ids) + 2, limit) for e in tokenizer.encode_batch(list(corpus[:2048]), add_special_tokens=False)]
    real = planned = naive = 0
    for i in range(0, len(lengths), arrivals):
        group = lengths[i : i + arrivals]
        real += sum(group)
        naive += len(group) * max(group)
        for sub in plan_batches(group, config.max_batch_size, config.max_batch_tokens, cost):
            planned += len(sub) * max(group[j] for j in sub.tolist())
    return {"texts": len(lengths), "arrivals_per_batch": arrivals, "mean_tokens": round(real / max(len(lengths), 1), 1),
            "planned_padded_per_real": round(planned / max(real, 1), 3),
            "pad_to_longest_per_real": round(naive / max(real, 1), 3)}


def _architecture(path: Path) -> dict:
    import json

    config = json.loads((path / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size", "max_position_embeddings")
    return {k: config.get(k) for k in keys}


# --- accuracy --------------------------------------------------------------------------------------


class _OnnxAsTorch:
    """Just enough of a transformers model for ``trainer.evaluate``: an ONNX file scored by exactly the
    code that ``trainer evaluate`` runs on the PyTorch weights."""

    def __init__(self, session, config):
        self._session = session
        self.config = config
        self.device = "cpu"

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask):
        import torch

        logits = self._session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
        return SimpleNamespace(logits=torch.from_numpy(np.asarray(logits, dtype=np.float32)))


def accuracy(model_dir: Path, args: argparse.Namespace) -> dict:
    """Validation metrics for fp32 and INT8 ONNX (and the PyTorch weights), with the INT8 - fp32 gap."""
    from transformers import AutoConfig, AutoTokenizer

    from model_contract.model_dir import ModelDir
    from trainer.data import SpanExample, load_category, load_spans
    from trainer.evaluate import evaluate_category, evaluate_pii

    md = ModelDir.read(model_dir)
    files = [f for f in (args.category_data if md.task == "category" else args.pii_data) if f.is_file()]
    if not files:
        return {"skipped": "no validation data"}
    matches = full_build_matches(md.path, args.full_models)
    if matches is False:  # a different build: score it whole (its own tokenizer and files), and say so
        md = ModelDir.read(args.full_models / md.path.name)
    max_length = min(512, md.max_position_embeddings)
    config = AutoConfig.from_pretrained(md.path)
    tokenizer = AutoTokenizer.from_pretrained(md.path)
    if md.task == "category":
        known = set(md.labels)
        examples = [e for f in files for e in load_category(f) if e.label in known]

        def score(model):
            return evaluate_category(model, tokenizer, examples, max_length)["metrics"]
        headline = "accuracy"
    else:
        known = {label[2:] for label in md.labels if label != "O"}
        examples = [SpanExample(e.text, tuple(s for s in e.spans if s.label in known), e.source, e.row)
                    for f in files for e in load_spans(f)]

        def score(model):
            return evaluate_pii(model, tokenizer, examples, max_length, stride=64)["metrics"]
        headline = "entity_f1"
    out: dict = {"data": [str(f) for f in files], "examples": len(examples), "headline": headline, "metrics": {},
                 "scored": str(md.path), "full_build_is_shipped": matches}
    for runtime, name in (("onnx", "model.onnx"), ("onnx-int8", "model.int8.onnx")):
        path = full_model_file(md.path, name, args.full_models)
        if path is not None:
            out["metrics"][runtime] = _rounded(score(_OnnxAsTorch(ort_session(path, False, args.threads), config)))
            log(f"  accuracy {runtime}: {headline} {out['metrics'][runtime][headline]}")
    weights = full_model_file(md.path, "model.safetensors", args.full_models)
    if weights is not None:
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        auto = AutoModelForSequenceClassification if md.spec.head == "sequence" else AutoModelForTokenClassification
        out["metrics"]["torch"] = _rounded(score(auto.from_pretrained(weights.parent)))
    m = out["metrics"]
    if "onnx" in m and "onnx-int8" in m:
        gap = {k: round(100.0 * (m["onnx-int8"][k] - m["onnx"][k]), 2) for k in m["onnx"]}
        out["int8_minus_fp32_points"] = gap
        out["int8_within_1_point"] = all(abs(v) <= 1.0 for v in gap.values())
    return out


def _rounded(metrics: dict) -> dict:
    return {k: round(float(v), 4) for k, v in metrics.items() if isinstance(v, int | float)}


# --- plot ------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    batches = results["settings"]["batches"]
    fig, axes = plt.subplots(len(models), len(batches), figsize=(4.2 * len(batches), 3.4 * len(models)), squeeze=False)
    for r, model in enumerate(models):
        series = sorted({(row["path"], row["runtime"]) for row in model["rows"]})
        for c, b in enumerate(batches):
            ax = axes[r][c]
            for kind, runtime in series:
                pts = sorted((row["length"], row["median_ms"]) for row in model["rows"]
                             if row["path"] == kind and row["runtime"] == runtime and row["batch"] == b)
                if pts:
                    style = "-o" if kind == "engine" else "--."
                    ax.plot(*zip(*pts, strict=True), style, label=f"{kind} {runtime}", markersize=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model['task']}  batch {b}", fontsize=10)
            ax.set_xlabel("tokens per sequence")
            ax.set_ylabel("ms per call")
            ax.grid(True, which="both", alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    return save_figure(fig, path, "Engine vs ONNX Runtime floor", results, fontsize=10)


def summarize(models: list[dict]) -> dict:
    """Engine/floor ratios (median and worst over the grid) and the fp32/INT8 speed ratio."""
    ratios = [row["ratio_to_floor"] for m in models for row in m["rows"] if row.get("ratio_to_floor")]
    speed = []
    for m in models:
        by = {(r["runtime"], r["length"], r["batch"]): r["median_ms"] for r in m["rows"] if r["path"] == "floor"}
        speed += [by[("onnx", n, b)] / ms for (rt, n, b), ms in by.items() if rt == "onnx-int8" and ("onnx", n, b) in by]
    return {
        "engine_to_floor_median": round(float(np.median(ratios)), 3) if ratios else None,
        "engine_to_floor_worst": round(max(ratios), 3) if ratios else None,
        "engine_to_floor_geomean": round(math.exp(np.mean(np.log(ratios))), 3) if ratios else None,
        "fp32_over_int8_time_median": round(float(np.median(speed)), 3) if speed else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runtimes = (args.runtimes.split(",") if args.runtimes else
                ["onnx", "onnx-fp16", "torch"] if args.device == "cuda" else ["onnx-int8", "onnx", "torch"])
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    corpus = corpus_texts(args.corpus)
    results: dict = {
        "bench": "inference",
        "machine": machine(args.device),
        "contended": busy_processes(),
        "settings": {"lengths": lengths, "batches": batches, "runtimes": runtimes, "engine_runtime": args.engine_runtime,
                     "threads": args.threads, "small_pass_tokens": args.small_pass_tokens, "min_time_s": args.min_time, "min_reps": args.min_reps,
                     "checksums": True, "timing": "median wall time of one call: a floor call is one run of "
                     "[batch, length] ids; an engine call is `batch` concurrent requests; for each (length, "
                     "batch) every floor and the engine take turns in three rounds"},
        "models": [],
        "accuracy": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for model_dir in args.models:
            log(f"{model_dir}:")
            results["models"].append(bench_model(model_dir, args, runtimes, lengths, batches, corpus, Path(tmp)))
            if not args.no_accuracy:
                results["accuracy"][results["models"][-1]["task"]] = accuracy(model_dir, args)
    results["summary"] = summarize(results["models"])
    write_json(args.out, results)
    log(f"wrote {args.out}")
    if args.plot:
        log(f"wrote {plot(results, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
