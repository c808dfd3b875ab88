"""Markdown summary of the bench results (``bench/results/summary.md``).

Reads whichever of ``inference.json``, ``naive.json`` and ``envoy.json`` exist in the results folder and
states the machine they ran on; the targets table says what was measured against what was aimed for.
``docs/generate.py`` renders the tables of ``docs/benchmarks.md`` with these same functions, so this module
imports nothing outside the standard library at load time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable like under `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"  # bench.common.RESULTS, without its numpy import

TARGETS = {
    "overhead": 2.0,   # ms, p50 of (b) - (a) at one connection
    "noop_rps": 1000.0,
    "engine_ratio": 1.2,
    "naive_ratio": 3.0,
    "accuracy_points": 1.0,
}


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{abs(x) if round(x, digits) == 0 else x:,.{digits}f}"  # no "-0" for a value that rounds to zero


def yes(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def machine_line(results: list[dict]) -> str:
    m = results[0]["machine"]
    contended = any(r.get("contended") for r in results)
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"Measured on {m['cpu']}, {m['cores']} cores ({m.get('cores_usable', m['cores'])} usable), "
            f"{m.get('memory_gib', '?')} GiB{gpu}; Python {m['python']}, ONNX Runtime {m.get('onnxruntime', '?')}, "
            f"PyTorch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}."
            + (" **Another heavy job shared the machine during these runs: numbers are contended.**" if contended else "")
            + when(results))


def when(results: list[dict]) -> str:
    """When each part ran and how fast the machine was then (bench.common.speed_probe_ms), so parts taken
    hours apart on a drifting VM can be compared."""
    runs = [(r.get("bench", "?"), r["machine"]) for r in results if r["machine"].get("started_utc")]
    if not runs:
        return ""
    return " Runs: " + "; ".join(f"{name} {m['started_utc']} (speed probe {m['speed_probe_ms']} ms)" for name, m in runs) + "."


def targets(inf: dict | None, naive: dict | None, envoy: dict | None) -> str:
    rows = []
    if envoy:
        s = envoy["summary"]
        c1 = s["per_concurrency"].get("1", {})
        over = c1.get("protocol_overhead_p50_ms")
        rows.append(["Protocol overhead, p50 at 1 connection: (b) - (a)", f"{fmt(over)} ms", f"< {TARGETS['overhead']:g} ms",
                     yes(None if over is None else over < TARGETS["overhead"])])
        peak = s.get("noop_peak_rps")
        rows.append(["Sidecar with no models, best rate through Envoy", f"{fmt(peak, 0)} req/s",
                     f">= {TARGETS['noop_rps']:,.0f} req/s", yes(None if peak is None else peak >= TARGETS["noop_rps"])])
    if inf:
        s = inf["summary"]
        rows.append(["Engine / ONNX Runtime floor, median over the grid (worst)",
                     f"{fmt(s['engine_to_floor_median'])} ({fmt(s['engine_to_floor_worst'])})", f"<= {TARGETS['engine_ratio']:g}",
                     yes(None if s["engine_to_floor_median"] is None else s["engine_to_floor_median"] <= TARGETS["engine_ratio"])])
    if naive:
        ratios = naive["summary"]["ratio_by_concurrency"]
        top = ratios.get("32", ratios.get(32))
        rows.append(["Engine / naive pipeline() throughput at 32 in flight", f"{fmt(top, 1)}x", f">= {TARGETS['naive_ratio']:g}x",
                     yes(None if top is None else top >= TARGETS["naive_ratio"])])
        p = naive["check"]["passes_per_request"]
        rows.append(["Forward passes per request alone (category, PII)", f"{p['category']:g}, {p['pii']:g}", "<= 1 each",
                     yes(p["category"] <= 1 and p["pii"] <= 1)])
    if inf:
        for task, acc in inf.get("accuracy", {}).items():
            if "int8_minus_fp32_points" in acc:
                head = acc["headline"]
                gap = acc["int8_minus_fp32_points"][head]
                rebuild = " (a rebuild, see below)" if acc.get("full_build_is_shipped") is False else ""
                rows.append([f"INT8 - fp32 on validation, {task} {head.replace('_', ' ')}{rebuild}", f"{gap:+.2f} points",
                             f"within {TARGETS['accuracy_points']:g}", yes(acc["int8_within_1_point"])])
    return table(["target", "measured", "aim", "met"], rows) if rows else ""


def envoy_tables(envoy: dict) -> str:
    cases = envoy["cases"]
    conc = envoy["settings"]["concurrency"]
    header = ["connections"] + [f"{name}: req/s, p50 / p99 ms" for name in cases]
    rows = []
    for c in conc:
        row: list[object] = [c]
        for case in cases.values():
            r = next((r for r in case["rows"] if r["concurrency"] == c), None)
            if r is None:
                row.append("-")
                continue
            actions = r.get("sidecar", {}).get("actions", {})
            notes = [f"{r['errors']} errors"] if r["errors"] else []
            if r.get("non_2xx"):
                notes.append(f"{r['non_2xx']} refused" + (f", {actions['block']} blocked by PII policy" if actions.get("block") else ""))
            if actions.get("degraded"):
                notes.append(f"{100 * actions['degraded'] / max(r['requests'], 1):.0f}% degraded, "
                             f"{fmt(r.get('inferred_rps'), 0)} req/s inferred")
            row.append(f"{fmt(r['rps'], 0)}, {fmt(r['p50_ms'])} / {fmt(r['p99_ms'])}" + (f" ({'; '.join(notes)})" if notes else ""))
        rows.append(row)
    out = [table(header, rows), "", "; ".join(f"**{k}** = {v['description']}" for k, v in cases.items()) + ". "
           "*Degraded*: the sidecar's `failure.timeout_ms` (250 ms) ran out while the request queued for the "
           "models, so it went to the default backend without inference (fail open); *blocked*: refused (403) "
           "by the PII policy, as router.yaml asks for card numbers sent to business-expert."]
    top = max(conc)
    cpu_rows = []
    for name, case in cases.items():
        r = next((r for r in case["rows"] if r["concurrency"] == top), None)
        if r:
            cpu = r["cpu_ms_per_request"]
            cpu_rows.append([name] + [fmt(cpu.get(k), 3) for k in ("loadgen", "envoy", "sidecar", "mocks")]
                            + [fmt(r["cpu_utilisation"])])
    out += ["", f"CPU time per request by process at {top} connections (ms; cores busy in the last column):", "",
            table(["case", "load generator", "Envoy", "sidecar", "mock backends", "cores busy"], cpu_rows)]
    m = cases.get("models", {}).get("rows", [])
    batches = [(r["concurrency"], r.get("sidecar", {})) for r in m]
    if batches:
        out += ["", "Sidecar forward passes in case (c): windows per pass (passes per request), category / PII:", "",
                table(["connections", "category", "PII"],
                      [[c, *(f"{s[k]['mean_batch']:g} ({s[k]['passes_per_request']:g})" if k in s else "-"
                             for k in ("category", "pii"))] for c, s in batches])]
    floor = envoy.get("request_floor", {})
    if "both_mean_ms" in floor:
        c1 = envoy["summary"]["per_concurrency"].get("1", {})
        out += ["", f"Inference floor of this request mix, one request at a time through ONNX Runtime: "
                    f"{fmt(floor['both_mean_ms'])} ms (category {fmt(floor['category']['mean_ms'])} ms on "
                    f"{floor['category']['mean_tokens']:g} tokens, PII {fmt(floor['pii']['mean_ms'])} ms on "
                    f"{floor['pii']['windows_per_request']:g} windows, {floor['pii']['mean_tokens']:g} tokens); "
                    f"(c) - (b) at p50, 1 connection: {fmt(c1.get('inference_p50_ms'))} ms."
                    + (" The floor runs the two models one after the other, every window in a pass of its own, each "
                       "with the sessions it would have alone; the sidecar runs them at once, with its share of the cores each, and a "
                       "request's windows in one pass, so it can come in under the floor."
                       if (c1.get("inference_p50_ms") or 0) < floor["both_mean_ms"] else "")]
    s = envoy["settings"]
    rounds = s.get("rounds", 1)
    taken = f"the median of {rounds} runs of {s['duration_s']} s taken in turns" if rounds > 1 else f"{s['duration_s']} s"
    out += ["", f"Load generator: {s.get('loadgen')}, closed loop, {taken} per point after "
                f"{s['warmup_s']} s warm-up; Envoy with {s['envoy_concurrency'] or 'one per core'} worker thread(s); "
                f"{s['requests']} distinct chat requests (system prompt + question, every fourth with PII), "
                f"{s['mean_body_bytes']:g} bytes on average."]
    return "\n".join(out)


def inference_tables(inf: dict) -> str:
    out = []
    for model in inf["models"]:
        arch = model["architecture"]
        rows = model["rows"]
        by = {(r["path"], r["runtime"], r["length"], r["batch"]): r for r in rows}
        runtimes = [rt for rt in inf["settings"]["runtimes"] if any(k[1] == rt and k[0] == "floor" for k in by)]
        engine_rt = model["engine"]["runtime"]
        header = ["tokens", "batch"] + [f"{rt} floor" for rt in runtimes] + [f"Engine ({engine_rt})", "Engine / floor"]
        body = []
        for n in inf["settings"]["lengths"]:
            for b in inf["settings"]["batches"]:
                e = by.get(("engine", engine_rt, n, b))
                if e is None:
                    continue
                body.append([n, b] + [fmt(by[("floor", rt, n, b)]["median_ms"]) if ("floor", rt, n, b) in by else "-"
                                      for rt in runtimes] + [fmt(e["median_ms"]), fmt(e["ratio_to_floor"])])
        out += [f"**{model['task']}** ({arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}, "
                f"{model['labels']} labels): ms per call, median", "", table(header, body), ""]
        pad = model.get("padding")
        if pad:
            out += [f"Padding on real text lengths ({pad['texts']} texts, {pad['mean_tokens']:g} tokens on average, "
                    f"{pad['arrivals_per_batch']} per batch): {pad['planned_padded_per_real']:g} padded tokens per real "
                    f"token with the length-sorted plan, {pad['pad_to_longest_per_real']:g} padding each batch to its "
                    "longest.", ""]
    acc_rows = []
    for task, acc in inf.get("accuracy", {}).items():
        for runtime, m in acc.get("metrics", {}).items():
            acc_rows.append([task, runtime, acc["examples"], *(fmt(m.get(k), 4) for k in
                            (("accuracy", "f1") if task == "category" else ("entity_f1", "f1")))])
    if acc_rows:
        out += ["Validation metrics by runtime (category: accuracy, weighted F1; PII: entity F1, token F1):", "",
                table(["model", "runtime", "examples", "accuracy / entity F1", "F1 / token F1"], acc_rows), ""]
        rebuilt = [task for task, acc in inf["accuracy"].items() if acc.get("full_build_is_shipped") is False]
        if rebuilt:
            out += [f"The full build in `build/models` is not the one shipped for {' and '.join(rebuilt)} (another "
                    "`make models` run; training is not bit-for-bit repeatable), so these rows score that build, all "
                    "its files with its own tokenizer; its fp32 and PyTorch floors time the same architecture.", ""]
    s = inf["summary"]
    small = inf["settings"].get("small_pass_tokens", 0)
    small_note = f": passes of at most {small} tokens on one thread, `models.*.small_pass_tokens`" if small else ""
    out.append(f"fp32 ONNX takes {fmt(s['fp32_over_int8_time_median'])}x the time of INT8 (median over the grid). "
               f"An ONNX floor call is one pass of the sidecar's own ONNX Runtime backend on `[batch, tokens]` ids, "
               f"called directly (the same sessions{small_note}); an "
               f"Engine call is `batch` concurrent requests whose one-line texts tokenize to exactly `tokens` tokens "
               f"(tokenization, batching, decoding and checksums included).")
    return "\n".join(out)


def naive_table(naive: dict) -> str:
    rows = [[r["concurrency"], f"{fmt(r['naive']['rps'], 1)} ({fmt(r['naive']['p50_ms'], 1)} ms)",
             f"{fmt(r['ours']['rps'], 1)} ({fmt(r['ours']['p50_ms'], 1)} ms)", f"{r['ratio']:.1f}x"] for r in naive["rows"]]
    s = naive["settings"]
    ours = ", ".join(f"{k} {v['runtime']}" for k, v in s["ours"].items())
    return "\n".join([
        table(["in flight", "naive pipeline(): req/s (p50)", "Engine: req/s (p50)", "ours / naive"], rows), "",
        f"Naive: {s['naive']['how']}, fp32. Ours: {ours}. {s['texts']} texts of {s['mean_chars']:g} characters on "
        f"average; a request is the category and the PII entities of one text. The two agree on the category of "
        f"{100 * naive['check']['category_agreement']:.0f}% of {naive['check']['texts']} texts"
        + (" (the naive peer runs the PyTorch weights of another build of the same recipe)."
           if False in s.get("full_build_is_shipped", {}).values() else ".")])


def request_path_line(rp: dict) -> str:
    count = rp.get("callgrind") or {}
    instructions = f", {count['instructions_per_request']:,} instructions (callgrind)" if count else ""
    return (f"The sidecar's own Python per chat request, without gRPC, Envoy or models (`bench/request_path.py`: both "
            f"ext_proc messages parsed, answered through the processor with routing, rewrite, metrics and the "
            f"log event, answers serialized): {fmt(rp['us_per_request'], 1)} us in a hot loop{instructions}.")


def render(folder: Path) -> str:
    inf, naive, envoy = load(folder, "inference"), load(folder, "naive"), load(folder, "envoy")
    request_path = load(folder, "request_path")
    if naive and "rows" not in naive:
        naive = None  # skipped: no PyTorch weights
    present = [r for r in (inf, naive, envoy) if r]
    if not present:
        raise SystemExit(f"no results in {folder}")
    timed = present + ([request_path] if request_path else [])
    parts = ["## Benchmarks", "", machine_line(timed), "", targets(inf, naive, envoy), ""]
    if envoy:
        parts += ["### Through Envoy", "", envoy_tables(envoy), "", "![through Envoy](envoy.png)", ""]
    if request_path:
        parts += [request_path_line(request_path), ""]
    if naive:
        parts += ["### Against a naive `pipeline()` server", "", naive_table(naive), "", "![naive](naive.png)", ""]
    if inf:
        parts += ["### Inference floor", "", inference_tables(inf), "", "![inference](inference.png)", ""]
    parts.append("Reproduce with `make bench` (each script also runs alone: `python bench/<name>.py --help`).")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder with the bench JSON files")
    p.add_argument("--out", type=Path, default=None, help="default: summary.md in the results folder")
    args = p.parse_args(argv)
    from bench.common import log

    out = args.out or args.results / "summary.md"
    out.write_text(render(args.results), encoding="utf-8")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
