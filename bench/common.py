"""What the bench scripts share: the machine they ran on, inputs of exact token lengths, timing, output.

Every script writes one JSON document with the same ``machine`` block, so a number is never separated
from the hardware (and the load) it was taken on.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODELS = [ROOT / "models" / "category", ROOT / "models" / "pii"]
# Where `make models` keeps the full model directories (fp32 ONNX, PyTorch weights) that the shipped,
# INT8-only directories leave out; looked up by the shipped directory's name.
FULL_MODELS = ROOT / "build" / "models"
DATA = ROOT / "build" / "models" / "data"

# Used when no validation file is at hand (a fresh checkout, the smoke test): plain English prose.
FALLBACK_CORPUS = (
    "The committee met on Tuesday to review the budget for the coming year and agreed that the new "
    "laboratory should open in the spring. Several members asked how the hospital would pay for the extra "
    "staff, and the treasurer explained that the grant covers salaries for the first three years. A student "
    "wanted to know whether the derivative of a product is the product of the derivatives; the lecturer "
    "wrote the product rule on the board and worked through two examples. Contracts signed under duress are "
    "generally voidable, and the court will look at whether the party had a reasonable alternative. "
    "Mitochondria produce most of the cell's energy through oxidative phosphorylation, while chloroplasts "
    "capture light. Interest rates rose again last quarter, which made mortgages more expensive for first "
    "time buyers in most large cities. "
)


def machine(device: str = "cpu") -> dict:
    """CPU model, cores, memory, library versions, load average and (on CUDA) the GPU."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "speed_probe_ms": speed_probe_ms(),
        "device": device,
    }
    for module in ("onnxruntime", "torch", "transformers", "tokenizers"):
        with contextlib.suppress(ImportError):
            info[module] = __import__(module).__version__
    if device == "cuda" and shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        )
        info["gpu"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return info


def speed_probe_ms(rounds: int = 7) -> float:
    """Milliseconds a fixed pure-Python workload takes here now (median of `rounds`). A shared VM's speed
    drifts by 2-3x from hour to hour (seen here); results taken at different times compare only
    through this."""
    def work() -> int:
        total = 0
        for i in range(200_000):
            total += i * i % 7
        return total

    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000.0)
    return round(statistics.median(times), 2)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def busy_processes(pattern: str = "models/build.py") -> bool:
    """Whether a known heavy job (the model build) shares the machine: such numbers are marked contended."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return any(int(p) != os.getpid() for p in out.stdout.split())


def corpus_texts(files: Sequence[Path] = (), fallback: bool = True) -> list[str]:
    """Texts to cut inputs from: the `text`/`full_text` field of JSONL files, else (with `fallback`) the
    built-in prose."""
    texts: list[str] = []
    for path in files:
        if not Path(path).is_file():
            continue
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts.append(row.get("text") or row.get("full_text") or "")
    texts = [t for t in texts if t.strip()]
    return texts or ([FALLBACK_CORPUS] if fallback else [])


def texts_of_length(tokenizer, corpus: Sequence[str], n_tokens: int, count: int, seed: int = 0) -> list[str]:
    """`count` different texts that each tokenize (without special tokens) to exactly `n_tokens` tokens.

    Each is a stretch of the joined corpus cut at a token edge; a cut that re-tokenizes shorter is topped
    up with one-token words, so the model sees real text and exactly the length asked for.
    """
    joined = " ".join(corpus)
    while len(joined) < 40 * n_tokens * max(count, 1):
        joined += " " + joined
    encoding = tokenizer.encode(joined, add_special_tokens=False)
    offsets = encoding.offsets
    total = len(offsets)
    rng = np.random.default_rng(seed + n_tokens)
    out = []
    for _ in range(count):
        start_tok = int(rng.integers(0, max(total - 2 * n_tokens, 1)))
        start = offsets[start_tok][0]
        text = _cut(tokenizer, joined, offsets, start_tok, start, n_tokens)
        out.append(text)
    return out


def _cut(tokenizer, joined: str, offsets, start_tok: int, start: int, n_tokens: int) -> str:
    def length(t: str) -> int:
        return len(tokenizer.encode(t, add_special_tokens=False).ids)

    for k in range(n_tokens, 0, -1):
        text = joined[start : offsets[start_tok + k - 1][1]]
        have = length(text)
        if have > n_tokens:
            continue
        while have < n_tokens:
            text += " a"
            have = length(text)
        if have == n_tokens:
            return text
    raise ValueError(f"could not make a text of exactly {n_tokens} tokens")


def interleaved(fns: dict[str, Callable[[], object]], min_time_s: float, min_reps: int, rounds: int = 3) -> dict[str, dict]:
    """Wall time of each of `fns` in ms, measured in turns: `rounds` rounds, each giving every function
    ``min_time_s / rounds`` seconds (and enough runs for `min_reps` in all), each turn after one untimed run.

    Taking turns matters on a shared or virtual machine, whose speed drifts by tens of percent within
    minutes: a ratio between two functions measured side by side survives that drift, one between
    measurements taken minutes apart does not. The untimed run at the start of every turn keeps the switch
    itself out of the figures: the first call after another function ran finds its threads asleep and
    its caches taken (measured: the engine's first call after the floor's 5-25% slower than the next),
    a cost of taking turns that a server running one model does not pay.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, -(-min_reps // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            started = time.perf_counter()
            done = 0
            while done < per_round or time.perf_counter() - started < min_time_s / rounds:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1000.0)
                done += 1
    return {name: {**summary(times), "calls": len(times) + rounds} for name, times in samples.items()}


def summary(times_ms: Sequence[float]) -> dict:
    """Median and spread of timings in ms."""
    times = sorted(times_ms)
    return {
        "median_ms": round(statistics.median(times), 4),
        "p10_ms": round(times[int(0.1 * (len(times) - 1))], 4),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))], 4),
        "reps": len(times),
    }


def save_figure(fig, path: Path, title: str, results: dict, fontsize: int = 9) -> Path:
    """Title a plot with the machine it ran on (and whether it was contended), save it and free it."""
    import matplotlib.pyplot as plt

    m = results["machine"]
    fig.suptitle(f"{title} ({m['cpu']}, {m['cores']} cores{', contended' if results['contended'] else ''})",
                 fontsize=fontsize)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def full_model_file(model_dir: Path, name: str, full_root: Path | None) -> Path | None:
    """`name` in `model_dir`, else in the full build of the same model (``full_root/<dir name>``)."""
    for d in (model_dir, full_root / model_dir.name if full_root else None):
        if d is not None and (d / name).is_file():
            return d / name
    return None


def full_build_matches(model_dir: Path, full_root: Path | None) -> bool | None:
    """Whether the full build under `full_root` is the build `model_dir` ships (the same INT8 file), so
    that its fp32 and PyTorch files are that model's; None when there is no full build to compare.
    A `make models` run that was not the one shipped (training is not bit-for-bit repeatable) still
    times the same architecture, but its weights, and even its tokenizer, are its own."""
    full = full_root / model_dir.name if full_root else None
    if full is None or full.resolve() == model_dir.resolve() or not (full / "model.int8.onnx").is_file():
        return None
    shipped = model_dir / "model.int8.onnx"
    return shipped.is_file() and filecmp.cmp(shipped, full / "model.int8.onnx", shallow=False)


def ensemble_members(model_dir: Path) -> list[dict] | None:
    """The members of a `trainer ensemble` directory as its eval_results.json names them, each with ``dir``
    (a relative path is from the checkout's root, where `make models` runs) and ``joined`` (whether the
    member's INT8 file is still the one the ensemble joined); None when `model_dir` is not an ensemble."""
    from trainer.ensemble import file_digest  # what the ensemble recorded its members with

    report = model_dir / "eval_results.json"
    if not report.is_file():
        return None
    members = json.loads(report.read_text(encoding="utf-8")).get("ensemble", {}).get("members")
    if not members:
        return None
    out = []
    for m in members:
        d = Path(m["path"]) if Path(m["path"]).is_absolute() else ROOT / m["path"]
        int8, want = d / "model.int8.onnx", m.get("sha256", {}).get("model.int8.onnx")
        joined = int8.is_file() and want is not None and file_digest(int8) == want
        out.append({"dir": d, "weight": m.get("weight"), "joined": joined})
    return out


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)
