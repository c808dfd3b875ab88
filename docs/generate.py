#!/usr/bin/env python3
"""Rewrite the generated regions of the docs from the results files (`make docs`).

A region is everything between two markers on lines of their own:

    <!-- generated:NAME:start -->
    ...
    <!-- generated:NAME:end -->

Its text comes from the renderer of that NAME below, fed by ``models/<model>/eval_results.json`` (and the
model's ``config.json`` for its size) or ``bench/results/*.json``; text outside the markers is written by hand and left alone. ``--check`` writes
nothing and exits 1 when a doc differs from what this script would write (``tests/test_docs.py`` runs it),
so a figure can never be edited by hand out of step with the file it comes from.

Standard library only: no install needed. The bench tables are ``bench/report.py``'s own (the functions
that write ``bench/results/summary.md``). Missing files and missing keys are skipped, never guessed: the
model reports change shape when the recipe does, so their sections are rendered from whatever they hold.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402  (standard library only, like this script)

MODELS = ("category", "pii")
SKIP = {"confusion matrix", "confusion_matrix"}  # at any depth: a matrix of counts is the model card's to draw
REGION = re.compile(r"(<!-- generated:(?P<name>[\w.-]+):start -->\n)(?P<body>.*?)(<!-- generated:(?P=name):end -->)",
                    re.S)
START = re.compile(r"<!-- generated:([\w.-]+):start -->")


# --- cells and tables ---------------------------------------------------------------------------------

def cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "-"
        if v.is_integer() and abs(v) >= 2:
            return f"{v:,.0f}"
        if v and abs(v) < 0.001:
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.2f}"
    if isinstance(v, list):
        return ", ".join(cell(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def label(key: object) -> str:
    """A key as a row or column title: snake_case spaced out; upper-case names (entity types) kept."""
    key = str(key)
    return key if key.isupper() else key.replace("_", " ")


def table(header: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    """A markdown table; numeric: every column but the first right-aligned."""
    rule = ["---" if i == 0 or not numeric else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def scalar(v: object) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def cellish(v: object) -> bool:
    return scalar(v) or (isinstance(v, list) and all(scalar(x) for x in v))


def flat(v: object) -> bool:
    return isinstance(v, dict) and bool(v) and all(cellish(x) for x in v.values())


def dig(d: object, *keys: str) -> object:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def render(obj: object, title: str = "", first: str = "") -> list[str]:
    """Markdown blocks for any JSON value: scalars as key/value rows, dicts of flat dicts as one table
    (rows: their keys; columns: the union of their keys), nested tables of such rows merged into one, deeper
    levels recursively with their path as the title. Nothing is assumed about the key names."""
    head = [f"**{title}**"] if title else []
    if isinstance(obj, list):
        if all(isinstance(x, str) for x in obj):
            return head + ["\n".join(f"- {cell(x)}" for x in obj)] if obj else []
        if obj and all(flat(x) for x in obj):
            cols = _columns(obj)
            return head + [table(cols, [[cell(x.get(c)) for c in cols] for x in obj])]
        if cellish(obj):
            return head + [cell(obj)]
        parts = [b for i, x in enumerate(obj, 1) for b in render(x, f"{title} #{i}" if title else f"#{i}", first)]
        return head + parts if parts else []
    if not isinstance(obj, dict):
        return head + [cell(obj)]
    blocks: list[str] = []
    scalars = {k: v for k, v in obj.items() if cellish(v)}
    if scalars:
        blocks.append(table(["", "value"], [[label(k), cell(v)] for k, v in scalars.items()]))
    rows = {k: v for k, v in obj.items() if isinstance(v, dict) and any(cellish(x) for x in v.values())}
    if rows:
        blocks += _matrix(rows, title, first)
    for k, v in obj.items():
        if k in scalars or k in rows or k in SKIP:
            continue
        if isinstance(v, (dict, list)):
            blocks += render(v, f"{title}, {label(k)}" if title else label(k), first)
    return head + blocks if blocks else []


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c, v in r.items() if cellish(v) and c not in cols]
    return cols


def _matrix(rows: dict[str, dict], title: str, first: str) -> list[str]:
    cols = _columns(list(rows.values()))
    sub_cols: dict[str, list[str]] = {}  # a flat dict in a row: its keys become columns "key sub"
    merged: dict[str, dict[str, dict]] = {}  # a dict of flat dicts in the rows: one table, a column pair per row
    deeper: list[tuple[str, str, object]] = []
    for name, r in rows.items():
        for k, v in r.items():
            if cellish(v) or k in SKIP:
                continue
            if flat(v):
                sub_cols.setdefault(k, [])
                sub_cols[k] += [c for c in v if c not in sub_cols[k]]
            elif isinstance(v, dict) and v and all(flat(x) for x in v.values()):
                merged.setdefault(k, {})[name] = v
            else:
                deeper.append((name, k, v))
    header = [first] + [label(c) for c in cols] + [f"{label(k)} {label(c)}" for k, cs in sub_cols.items() for c in cs]
    body = [[label(name)] + [cell(r.get(c)) for c in cols]
            + [cell(dig(r, k, c)) for k, cs in sub_cols.items() for c in cs] for name, r in rows.items()]
    blocks = [table(header, body)]
    for k, per_row in merged.items():
        inner: list[str] = []
        for v in per_row.values():
            inner += [i for i in v if i not in inner]
        pairs = [(name, c) for name, v in per_row.items() for c in _columns(list(v.values()))]
        blocks += [f"{label(k)}{', ' + title if title else ''}:",
                   table([""] + [f"{label(name)}: {label(c)}" for name, c in pairs],
                         [[label(i)] + [cell(dig(per_row[name], i, c)) for name, c in pairs] for i in inner])]
    for name, k, v in deeper:
        blocks += render(v, f"{title + ', ' if title else ''}{label(name)}, {label(k)}")
    return blocks


def table_like(x: object) -> bool:
    """A dict of flat dicts (per class, per type) or a list of flat dicts (coverage by threshold)."""
    values = x.values() if isinstance(x, dict) else x if isinstance(x, list) else None
    return bool(values) and all(flat(v) for v in values)


def nested(obj: object) -> list[str]:
    """Every scalar under obj as a key/value row named by its path (`exam / accuracy`), whatever the nesting;
    parts that are tables already (per class, per type, coverage by threshold) as tables of their own below,
    titled by their path. Confusion matrices are left to the model cards."""
    rows: list[list[str]] = []
    tables: list[str] = []

    def walk(x: object, path: tuple[str, ...]) -> None:
        title = " / ".join(path)
        if cellish(x):
            rows.append([title, cell(x)])
        elif path and path[-1] in SKIP:
            return
        elif table_like(x):
            tables.extend(render(x, title))
        else:
            items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else []
            for k, v in items:
                walk(v, (*path, label(k)))

    walk(obj, ())
    return ([table(["", "value"], rows)] if rows else []) + tables


# --- models --------------------------------------------------------------------------------------------

def model_report(root: Path, name: str) -> dict | None:
    path = root / "models" / name / "eval_results.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def model_config(root: Path, name: str) -> dict:
    """The model directory's config.json (architecture and sizes), {} when absent."""
    path = root / "models" / name / "config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def _minutes(s: object) -> str | None:
    return f"{s / 60:.0f} min" if isinstance(s, (int, float)) else None


def _mb(b: object) -> str | None:
    return f"{b / 1e6:.1f} MB" if isinstance(b, (int, float)) else None


def _names(labels: object) -> str | None:
    """Class names, or entity types for BIO labels (``O`` and the ``B-``/``I-`` prefixes dropped)."""
    if not isinstance(labels, list):
        return None
    names: list[str] = []
    for x in map(str, labels):
        name = x[2:] if x[:2] in ("B-", "I-") else x
        if name != "O" and name not in names:
            names.append(name)
    return ", ".join(names)


def _files(paths: object) -> str | None:
    if not isinstance(paths, list):
        return None
    return ", ".join(f"`{Path(str(x)).name}`" for x in paths)


OVERVIEW: list[tuple[str, Callable[[dict], object]]] = [
    ("architecture", lambda r: dig(r, "_config", "architectures")),
    ("layers, hidden size", lambda r: None if dig(r, "_config", "num_hidden_layers") is None else
     f"{dig(r, '_config', 'num_hidden_layers')}, {dig(r, '_config', 'hidden_size')}"),
    ("vocabulary", lambda r: dig(r, "_config", "vocab_size")),
    ("output labels", lambda r: len(r["labels"]) if isinstance(r.get("labels"), list) else None),
    ("classes / entity types", lambda r: _names(r.get("labels"))),
    ("fine-tuned from", lambda r: r.get("base_model")),
    ("training data", lambda r: _files(dig(r, "data", "train"))),
    ("validation data", lambda r: _files(dig(r, "data", "validation"))),
    ("training examples", lambda r: dig(r, "data", "train_examples")),
    ("training windows", lambda r: dig(r, "data", "train_windows")),
    ("validation examples", lambda r: dig(r, "data", "validation_examples")),
    ("max length (tokens)", lambda r: dig(r, "settings", "max_length")),
    ("stride", lambda r: dig(r, "settings", "stride")),
    ("epochs", lambda r: dig(r, "settings", "epochs")),
    ("batch size", lambda r: dig(r, "settings", "batch_size")),
    ("learning rate", lambda r: dig(r, "settings", "learning_rate")),
    ("steps (best checkpoint)", lambda r: None if dig(r, "training", "steps") is None else
     f"{cell(dig(r, 'training', 'steps'))} ({cell(dig(r, 'training', 'best_step'))})"),
    ("trained on", lambda r: dig(r, "hardware", "name") or dig(r, "hardware", "device")),
    ("training time", lambda r: _minutes(dig(r, "time", "total_seconds"))),
    ("INT8 ONNX file", lambda r: _mb(dig(r, "export", "int8_bytes"))),
    ("INT8 / PyTorch argmax agreement", lambda r: dig(r, "export", "int8_argmax_agreement")),
    ("built", lambda r: r.get("created")),
    ("recipe", lambda r: r.get("recipe")),
]

# Sections rendered in this order when present, then any other top-level key that is not bookkeeping.
SECTIONS = {
    "metrics": ("Validation metrics (the trainer's evaluation, PyTorch fp32)", ""),
    "served_accuracy": ("Accuracy as served, by runtime", "runtime"),
    "served": ("As served", ""),
    "baseline": ("Baseline", ""),
    "confidence_threshold": ("Routing confidence: share of questions routed by category, and their accuracy, "
                             "by `routing.confidence_threshold`", "threshold"),
    "catch_rate": ("Catch rate (an entity is caught when every character of it is masked)", "split"),
    "false_masks_on_questions": ("Masks on PII-free questions", ""),
    "per_class": ("Per class (validation)", "class"),
    "per_type": ("Per entity type (validation)", "entity type"),
    "notes": ("Notes written by the build", ""),
}
BOOKKEEPING = {"task", "base_model", "labels", "data", "settings", "hardware", "training", "confusion_matrix",
               "time", "created", "versions", "export", "recipe"}


def models_overview(root: Path) -> str:
    reports = {name: model_report(root, name) for name in MODELS}
    present = {k: {**v, "_config": model_config(root, k)} for k, v in reports.items() if v}
    if not present:
        return "*No `models/*/eval_results.json`: run `make models`.*"
    rows = [["ensemble", *(_members(r) for r in present.values())]] if any("ensemble" in r for r in present.values()) \
        else []
    for title, get in OVERVIEW:
        values = [_overview_value(get, title, r) for r in present.values()]
        if any(v is not None for v in values):
            rows.append([title] + [cell(v) for v in values])
    return table([""] + [f"`models/{k}`" for k in present], rows, numeric=False)


SHARED_ROWS = ("output labels", "classes / entity types", "built", "recipe")
"""Overview rows an ensemble answers for itself; the rest describe how each member was made."""


def _members(r: dict) -> str:
    members = dig(r, "ensemble", "members")
    if not members:
        return "-"
    return f"{len(members)} members, logits averaged (`trainer ensemble`): " + ", ".join(f"`{m['path']}`" for m in members)


def _overview_value(get: Callable[[dict], object], title: str, r: dict) -> object:
    """A row's value; for an ensemble, each member's (joined by +, once when they agree) unless the row is one it
    answers itself."""
    members = dig(r, "ensemble", "members")
    if not members or title in SHARED_ROWS:
        return _safe(get, r)
    values = [_safe(get, {**(m.get("results") or {}), "_config": m.get("config") or {}}) for m in members]
    if all(v is None for v in values):
        return None
    shown = [cell(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else " + ".join(shown)


# Held-out figures beside their yardsticks and #13's targets: (measure, report, path to the figure under
# "served" and under the report's baseline, target).
TARGETS = [
    ("category: exam questions", "category", ("exam", "accuracy"), "baseline + 2 points"),
    ("category: everyday questions (never trained on)", "category", ("everyday", "accuracy"),
     "85% and baseline + 10 points"),
    ("PII caught: Presidio text, unseen templates", "pii", ("presidio_held_out_templates", "caught"), "97%"),
    ("PII caught: at any position in 1-8 KB of prose", "pii", ("any_position_1_8kb", "caught"), "95%"),
    ("PII caught: person names in WNUT-17 real text", "pii", ("wnut17_real_text", "per_type", "PERSON", "caught"),
     "75%"),
    ("false person, contact or number mask: exam questions naming no one", "pii",
     ("exam_questions_name_free", "with_person_contact_or_number_mask"), "at most 2%"),
    ("false person, contact or number mask: WNUT-17 sentences with no entity", "pii",
     ("wnut17_entity_free", "with_person_contact_or_number_mask"), "at most 2%"),
    ("any mask: our everyday questions naming no one", "pii", ("everyday_questions", "with_any_mask"), "none"),
]
BASELINES = {"category": ("baseline", "TF-IDF + SVM"), "pii": ("baseline_recognizers_only", "recognizers alone")}


def models_targets(root: Path) -> str:
    """The few figures a newcomer asks first: the bundled models on held-out sets, as served, beside the
    yardstick each must beat and the target #13 set."""
    reports = {name: model_report(root, name) for name in MODELS}
    if not any(reports.values()):
        return "*No `models/*/eval_results.json`: run `make models`.*"
    rows = []
    for what, name, path, target in TARGETS:
        value = dig(reports.get(name), "served", *path)
        if value is None:
            continue
        key, base_name = BASELINES[name]
        yardstick = dig(reports[name], key, *path)
        rows.append([what, f"{value:.1%}", f"{base_name} {yardstick:.1%}" if yardstick is not None else "-", target])
    return table(["held out, as served (INT8 through the Engine)", "bundled model", "baseline", "target (#13)"],
                 rows, numeric=False)


def _safe(get: Callable[[dict], object], r: dict) -> object:
    try:
        return get(r)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def model_sections(root: Path, name: str) -> str:
    r = model_report(root, name)
    if r is None:
        return f"*No `models/{name}/eval_results.json`: run `make models`.*"
    keys = [k for k in SECTIONS if k in r and k != "notes"] + [k for k in r if k not in SECTIONS and k not in BOOKKEEPING]
    keys += ["notes"] if "notes" in r else []
    blocks: list[str] = []
    for k in keys:
        title, first = SECTIONS.get(k, (label(k).capitalize(), ""))
        v = r[k]
        part = nested(v) if k == "served" and isinstance(v, (dict, list)) else \
            ensemble_block(v) if k == "ensemble" and isinstance(v, dict) else render(v, "", first)
        if part:
            blocks += [f"**{title}**", *part]
    return "\n\n".join(blocks) if blocks else f"*`models/{name}/eval_results.json` holds no metrics.*"


def ensemble_block(e: dict) -> list[str]:
    """An ensemble's members (how each was made, from its own report) and what the graph adds to their mean."""
    rows = []
    for m in e.get("members") or []:
        own, config = m.get("results") or {}, m.get("config") or {}
        layers = config.get("num_hidden_layers")
        rows.append([f"`{m.get('path')}`", cell(m.get("weight")),
                     "-" if layers is None else f"{layers}, {config.get('hidden_size')}", cell(own.get("base_model")),
                     cell(dig(own, "teacher", "model")), cell(dig(own, "settings", "epochs")),
                     cell(dig(own, "metrics", "f1")), cell(own.get("created"))])
    out = [table(["member", "weight", "layers, hidden size", "fine-tuned from", "learnt the predictions of", "epochs",
                  "validation f1", "built"], rows, numeric=False)] if rows else []
    bias = e.get("entity_bias")
    if bias:
        out.append("Added to the mean's logits inside the graph: " + ", ".join(f"{k} {v:+g}" for k, v in bias.items())
                   + ". " + str(e.get("entity_bias_how") or ""))
    return out


# --- benchmarks ----------------------------------------------------------------------------------------

def bench_results(root: Path, name: str) -> dict | None:
    path = root / "bench" / "results" / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def missing(name: str, how: str = "make bench") -> str:
    return f"*No `bench/results/{name}.json`: run `{how}`.*"


def bench_summary(root: Path) -> str:
    inf, naive, envoy, rp = (bench_results(root, n) for n in ("inference", "naive", "envoy", "request_path"))
    if naive and "rows" not in naive:
        naive = None
    timed = [r for r in (inf, naive, envoy, rp) if r and isinstance(r.get("machine"), dict)]
    if not timed:
        return "*No `bench/results/{inference,naive,envoy,request_path}.json`: run `make bench`.*"
    return report.machine_line(timed) + "\n\n" + report.targets(inf, naive, envoy)


def bench_one(name: str, fn: Callable[[dict], str]) -> Callable[[Path], str]:
    def renderer(root: Path) -> str:
        data = bench_results(root, name)
        return missing(name) if data is None else fn(data)
    return renderer


def naive_section(naive: dict) -> str:
    if "rows" not in naive:
        return "*The naive peer was skipped in the last run: it needs the PyTorch weights of `make models`.*"
    return report.naive_table(naive)


def envoy_run(envoy: dict) -> str:
    """A single Envoy run kept for comparison: where it ran, its rounds, its tables."""
    parts = (report.machine_line([envoy]), report.targets(None, None, envoy), rounds_line(envoy), report.envoy_tables(envoy))
    return "\n\n".join(x for x in parts if x)


def rounds_line(envoy: dict) -> str:
    """Per round, the protocol overhead at one connection and the no-model peak: the spread a median hides."""
    direct, noop = envoy["cases"].get("direct"), envoy["cases"].get("noop")
    if not direct or not noop:
        return ""
    by = {(case, r["concurrency"]): r.get("runs", []) for case, c in (("direct", direct), ("noop", noop)) for r in c["rows"]}
    one_d, one_n = by.get(("direct", 1), []), by.get(("noop", 1), [])
    rounds = min(len(one_d), len(one_n))
    if rounds < 2:
        return ""
    over = [one_n[i]["p50_ms"] - one_d[i]["p50_ms"] for i in range(rounds)]
    conc = envoy["settings"]["concurrency"]
    peaks = [max(by[("noop", c)][i]["rps"] for c in conc if len(by.get(("noop", c), [])) > i) for i in range(rounds)]
    direct = [max(by[("direct", c)][i]["rps"] for c in conc if len(by.get(("direct", c), [])) > i) for i in range(rounds)]
    return (f"Round by round: protocol overhead at 1 connection {', '.join(f'{x:.2f}' for x in over)} ms p50; "
            f"no-model peak {', '.join(f'{x:,.0f}' for x in peaks)} req/s; Envoy alone (direct), peak "
            f"{', '.join(f'{x:,.0f}' for x in direct)} req/s.")


def long_prompts(lp: dict) -> str:
    out = [report.machine_line([{**lp, "bench": lp.get("bench", "long_prompts")}])]
    rows = lp.get("long_prompts", [])
    if rows:
        out.append(table(["prompt"] + [f"{r['kib']:g} KiB" for r in rows],
                         [["answer at concurrency 1"] + [f"{r['status']}, {r['ms']:,.0f} ms" for r in rows],
                          ["values that reached the backend"] + [", ".join(r.get("leaked") or []) or "none" for r in rows]]))
    if "largest_read_whole_kib" in lp:
        out.append(f"Largest prompt read whole within Envoy's `message_timeout`: {lp['largest_read_whole_kib']:g} KiB.")
    after = lp.get("after_big", [])
    if after:
        out.append(table(["large request", "its answer", "small requests meanwhile: p50 / max"],
                         [[f"{a['big_kib']:g} KiB", f"{a['big_status']} in {a['big_ms']:,.0f} ms",
                           f"{a['small_p50_ms']:.1f} / {a['small_max_ms']:.1f} ms"] for a in after]))
    if "small_p50_ms_before" in lp:
        out.append(f"Small requests one after another, p50: {lp['small_p50_ms_before']:.1f} ms before the large "
                   f"ones, {lp.get('small_p50_ms_after', float('nan')):.1f} ms after.")
    burst = lp.get("burst")
    if burst:
        statuses = ", ".join(f"{n:,} answered {s}" for s, n in sorted(burst.get("statuses", {}).items()))
        out.append(f"Burst: {burst['clients']} clients sending {burst['requests']:,} mixed requests at once: {statuses}; "
                   f"values that reached a backend: {', '.join(burst.get('leaked') or []) or 'none'}.")
    rss = lp.get("rss_mib")
    if rss:
        out.append(table(["sidecar RSS"] + [label(k) for k in rss],
                         [["MiB"] + [f"{v:,.0f}" if isinstance(v, (int, float)) else cell(v) for v in rss.values()]]))
    if "leaked_anywhere" in lp:
        out.append(f"Any planted value reached a backend anywhere in the run: {cell(lp['leaked_anywhere'])}.")
    return "\n\n".join(out)


def line_windows(lw: dict) -> str:
    out = [report.machine_line([{**lw, "bench": lw.get("bench", "line_windows")}])]
    rows = lw.get("shapes", [])
    out.append(table(["text", "tokens", "line parts", "windows: whole / with lines", "PII engine time: off / on",
                      "on / off"],
                     [[r["shape"], f"{r['tokens']:,}", f"{r['line_parts']:,}",
                       f"{r['windows_whole']:,} / {r['windows_with_lines']:,}",
                       f"{r['off_ms']:,.1f} / {r['on_ms']:,.1f} ms", f"{r['ratio']:.2f}x"] for r in rows]))
    out.append(f"A line under {lw['line_tokens']} tokens is read with the lines after it. {lw.get('how', '')}.")
    return "\n\n".join(out)


def pseudonymize(ps: dict) -> str:
    out = [report.machine_line([{**ps, "bench": "pseudonymize"}])]
    r = ps.get("restoring", {})
    if r:
        out.append(f"Restoring alone (no network): {r['us_per_sse_event']:g} µs per server-sent event, "
                   f"{r['us_per_json_answer']:g} µs per {r['json_answer_bytes']:,}-byte JSON answer "
                   f"({r['placeholders']} placeholders).")
    e = ps.get("through_envoy", {})
    rows = [[f"{action}, {kind} answers", f"{run['requests_per_s']:g}", f"{run['p50_ms']:g}", f"{run['p95_ms']:g}",
             f"{run['answers_with_values']}/{run['requests']}"]
            for action in ("mask", "pseudonymize") for kind, run in (e.get(action) or {}).items()]
    if rows:
        first = next(iter(e["mask"].values()))
        out.append(f"Through Envoy, bundled models, {first['clients']} clients:")
        out.append(table(["policy", "requests/s", "p50 ms", "p95 ms", "answers with the values"], rows))
        out.append(f"Added per server-sent event (p50, {e.get('stream_events_per_answer')} events an answer): "
                   f"{e.get('added_ms_per_sse_event_p50')} ms; per JSON answer: {e.get('added_ms_per_json_answer_p50')} ms.")
    scan = e.get("answer_scan")
    if scan:
        rows = [[f"response_pii: {mode}, {kind} answers", f"{run['requests_per_s']:g}", f"{run['p50_ms']:g}",
                 f"{run['p95_ms']:g}", f"{run['answers_with_said_email']}/{run['requests']}"]
                for mode in ("off", "mask") for kind, run in scan[mode].items()]
        out.append(f"The answer scan, on answers of {scan['answer_chars']:,} characters that carry an email address "
                   f"the request did not ({scan['stream_events_per_answer']} events when streamed, window "
                   f"{scan['window_chars']} characters), every policy on `mask`:")
        out.append(table(["policy", "requests/s", "p50 ms", "p95 ms", "answers with the new address"], rows))
        out.append(f"Added by the scan (p50): {scan['added_ms_per_json_answer_p50']} ms per JSON answer, "
                   f"{scan['added_ms_per_stream_answer_p50']} ms per streamed answer.")
    return "\n\n".join(out)


def multitask(root: Path) -> str:
    files = sorted((root / "bench" / "results").glob("multitask*.json"))
    runs = [(f.name, json.loads(f.read_text(encoding="utf-8"))) for f in files]
    if not runs:
        return missing("multitask", "python bench/multitask.py")
    cols: list[tuple[str, str]] = []
    for _, r in runs:
        cols += [(head, m) for head, metrics in r.get("compare", {}).items() for m in metrics if (head, m) not in cols]
    single = runs[0][1].get("compare", {})
    rows = [["single-task models", "-"] + [cell(dig(single, h, m, "single")) for h, m in cols] + ["-"]]
    for name, r in runs:
        s = r.get("settings", {})
        how = f"lr {s['learning_rate']:g}" if "learning_rate" in s else "?"
        how += f", PII loss x{s['pii_weight']:g}" if s.get("pii_weight") else ", losses summed"
        rows.append([f"shared encoder: {how}", f"`{name}`"]
                    + [f"{cell(dig(r, 'compare', h, m, 'shared'))} ({dig(r, 'compare', h, m, 'points'):+.1f})"
                       if isinstance(dig(r, "compare", h, m, "points"), (int, float)) else "-" for h, m in cols]
                    + [cell(r.get("keeps_accuracy"))])
    out = [table(["model", "results", *(f"{h} {label(m)}" for h, m in cols), "kept"], rows),
           "Shared-encoder cells: score (points against the single-task model)."]
    first = runs[0][1]
    if first.get("rule"):
        out.append(f"Rule: {first['rule']}.")
    inf = first.get("inference", {})
    if "tokens_per_request_separate" in inf:
        out.append(f"Tokens read per request on the bench's request mix: {inf['tokens_per_request_separate']:g} with two "
                   f"models, {inf['tokens_per_request_shared']:g} with one shared encoder "
                   f"({100 * inf.get('share_saved', 0):.0f}% fewer).")
    m = first.get("machine", {})
    secs = [r.get("training", {}).get("seconds") for _, r in runs]
    if m.get("cpu"):
        out.append(f"Trained on {m['cpu']}, {m.get('cores', '?')} cores"
                   + (f", {' and '.join(_minutes(s) for s in secs if s)} per run" if any(secs) else "") + ".")
    return "\n\n".join(out)


def ab(result: dict) -> str:
    """`bench/ab.py`: an earlier commit against this tree, in turns on one host."""
    out = [report.machine_line([{**result, "bench": "ab"}])]
    keys = [("instructions_per_request", "instructions per request", "{:,}"),
            ("protocol_overhead_p50_ms_1", "protocol overhead, p50 at 1 connection (ms)", "{:g}"),
            ("noop_peak_rps", "no-model rate through Envoy, best (req/s)", "{:,.0f}"),
            ("direct_rps_1", "Envoy alone at 1 connection (req/s)", "{:,.0f}")]
    runs = result["runs"]
    rows = [[what] + [fmt.format(r[key]) for side in ("before", "after") for r in runs[side]]
            for key, what, fmt in keys]
    n = len(runs["before"])
    header = ["measure"] + [f"{result['before']} #{i + 1}" for i in range(n)] + \
        [f"{result['after'].split()[0]} #{i + 1}" for i in range(n)]
    out.append(table(header, rows))
    out.append(f"Load generator: {runs['before'][0].get('loadgen')}; rounds taken in turns, the earlier commit first "
               f"in odd rounds and last in even ones.")
    return "\n\n".join(out)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "models-overview": models_overview,
    "models-targets": models_targets,
    **{f"models-{name}": (lambda root, name=name: model_sections(root, name)) for name in MODELS},
    "bench-summary": bench_summary,
    "bench-envoy": bench_one("envoy", report.envoy_tables),
    "bench-request-path": bench_one("request_path", report.request_path_line),
    "bench-naive": bench_one("naive", naive_section),
    "bench-inference": bench_one("inference", report.inference_tables),
    "bench-long-prompts": bench_one("long_prompts", long_prompts),
    "bench-line-windows": bench_one("line_windows", line_windows),
    "bench-pseudonymize": bench_one("pseudonymize", pseudonymize),
    "bench-ab": bench_one("ab", ab),
    "bench-multitask": multitask,
    "bench-envoy-pii-guarantee": bench_one("envoy-pii-guarantee", envoy_run),
    "bench-envoy-rerun": bench_one("envoy-rerun", envoy_run),
}


def generated(name: str, root: Path) -> str:
    try:
        text = RENDERERS[name](root)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        print(f"warning: region {name!r} not generated: {type(e).__name__}: {e}", file=sys.stderr)
        text = f"*Not generated: the results file lacks what this table needs ({type(e).__name__}: {e}).*"
    return text.strip("\n")


def rewrite(text: str, root: Path, where: str) -> str:
    starts = START.findall(text)
    found = [m.group("name") for m in REGION.finditer(text)]
    if starts != found:
        raise SystemExit(f"{where}: a generated region has no end marker: {sorted(set(starts) - set(found))}")
    unknown = [n for n in found if n not in RENDERERS]
    if unknown:
        raise SystemExit(f"{where}: unknown generated region(s) {unknown}; known: {sorted(RENDERERS)}")
    return REGION.sub(lambda m: f"{m.group(1)}\n{generated(m.group('name'), root)}\n\n{m.group(4)}", text)


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a doc is out of step")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    args = p.parse_args(argv)
    stale = []
    for path in documents(args.root):
        if not path.is_file():
            continue
        old = path.read_text(encoding="utf-8")
        new = rewrite(old, args.root, str(path.relative_to(args.root)))
        if new == old:
            continue
        rel = str(path.relative_to(args.root))
        stale.append(rel)
        if args.check:
            sys.stderr.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel + " (generated)"))
        else:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {rel}")
    if args.check and stale:
        print(f"out of step with the results files: {', '.join(stale)}; run `make docs`", file=sys.stderr)
        return 1
    if not stale:
        print("docs up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
