"""The model card (``README.md``), written from ``eval_results.json`` so it never disagrees with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_contract.tasks import UnknownTask, get_task

CARD_FILE = "README.md"
_EXPORT_KEYS = ("onnx_max_abs_diff", "onnx_argmax_agreement", "onnx_bytes", "int8_quantization",
                "int8_max_abs_diff", "int8_argmax_agreement", "int8_batch_max_diff", "int8_bytes")
_HARDWARE_SETTINGS = ("mixed_precision", "gradient_checkpointing")  # requests; the card shows what ran

_PURPOSE = {
    "category": (
        "Subject classifier for the semantic-sidecar router: it reads the latest user message of a chat "
        "request and names its subject, which the router maps to a backend model."
    ),
    "pii": (
        "PII token classifier for the semantic-sidecar: it tags personal data in request text with BIO "
        "tags (Presidio entity names) so the sidecar can mask the spans or block the request."
    ),
}

_LIMITS = {
    "category": [
        "It knows only the labels listed above; anything else is forced into the nearest of them, so keep "
        "the router's confidence threshold and default model.",
        "Texts longer than the training max length are truncated; the subject must show early.",
        "Scores reflect the validation data's distribution; measure on your own traffic before relying on it.",
    ],
    "pii": [
        "It finds only the entity types listed above, and misses formats unlike its training data. Keep the "
        "sidecar's checksum recognizers on for card numbers and IBANs.",
        "Synthetic training text is cleaner than real traffic; expect lower recall on real messages.",
        "Not a guarantee of anonymisation: treat it as one layer of defence.",
    ],
}


def _head(task: str) -> str:
    try:
        return get_task(task).head
    except UnknownTask:
        return "sequence"


def _purpose(task: str) -> str:
    """The bundled tasks' own words; a registered task's description otherwise."""
    if task in _PURPOSE:
        return _PURPOSE[task]
    try:
        return get_task(task).description
    except UnknownTask:
        return ""


def render_card(results: dict[str, Any]) -> str:
    task = results.get("task", "category")
    body = _ensemble(results) if "ensemble" in results else [*_training(results), *_metrics(results, task)]
    lines = [*_front(results, task), *body, *_export(results),
             *_yardsticks(results), "## Intended use", "",
             "Serving inside semantic-sidecar from this directory (`config.json` carries the labels and "
             "`sidecar_task`; `model.onnx`/`model.int8.onnx` when exported). Not for decisions about people.", "",
             "## Limits", "", *(f"- {item}" for item in _LIMITS.get(task, [])), ""]
    return "\n".join(lines)


def _front(results: dict[str, Any], task: str) -> list[str]:
    data = results.get("data", {})
    windows = f", {data['train_windows']} windows" if "train_windows" in data else ""
    return [
        "---", "library_name: transformers",
        f"pipeline_tag: {'text-classification' if _head(task) == 'sequence' else 'token-classification'}",
        f"base_model: {results.get('base_model', 'unknown')}", "tags: [modernbert, semantic-sidecar]", "---", "",
        f"# semantic-sidecar {task} model", "", _purpose(task), "", "## Data", "",
        *([] if "ensemble" in results else [  # an ensemble's members each have their own
            f"- Training data: {', '.join(data.get('train', [])) or 'unknown'} "
            f"({data.get('train_examples', '?')} examples{windows})",
            f"- Validation data: {_validation(data)} ({data.get('validation_examples', '?')} examples)"]),
        f"- Labels ({len(results.get('labels', []))}): {', '.join(results.get('labels', []))}", "",
    ]


def _training(results: dict[str, Any]) -> list[str]:
    settings, training, hardware = (results.get(k, {}) for k in ("settings", "training", "hardware"))
    return [
        "## Training", "",
        f"Fine-tuned from `{results.get('base_model', 'unknown')}` with the Hugging Face Trainer on "
        f"{hardware.get('name', 'unknown device')}; the best checkpoint by validation "
        f"weighted F1 was kept (early stopping).", "", *_teacher(results),
        "| setting | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in settings.items() if k not in _HARDWARE_SETTINGS),
        f"| fp16 | {hardware.get('fp16', '?')} |",
        f"| gradient checkpointing | {hardware.get('gradient_checkpointing', '?')} |",
        f"| steps run | {training.get('steps', '?')} (stopped early: {training.get('stopped_early', '?')}) |",
        f"| time | {results.get('time', {}).get('total_seconds', '?')} s |", "",
    ]


def _ensemble(results: dict[str, Any]) -> list[str]:
    """An ensemble's card lists its members (each one's own card says how it was trained)."""
    ensemble = results["ensemble"]
    lines = ["## Ensemble", "", "One ONNX graph that runs each member on the same tokens and sums their logits, "
             "weighted (`trainer ensemble`). How each member was trained, from its own report:", "",
             "| member | weight | fine-tuned from | teacher | training data | epochs | validation f1 |",
             "|---|---|---|---|---|---|---|"]
    for m in ensemble.get("members", []):
        own = m.get("results") or {}
        f1 = (own.get("metrics") or {}).get("f1")
        data = own.get("data") or {}
        lines.append(f"| `{m.get('path')}` | {m.get('weight')} | {own.get('base_model') or '-'} | "
                     f"{(own.get('teacher') or {}).get('model') or '-'} | "
                     f"{', '.join(data.get('train', [])) or '-'} ({data.get('train_examples', '?')} examples) | "
                     f"{(own.get('settings') or {}).get('epochs', '-')} | "
                     f"{f'{f1:.4f}' if isinstance(f1, float) else '-'} |")
    if ensemble.get("entity_bias"):
        lines += ["", "Added to the mean's logits inside the graph (per entity type, B- and I-): "
                  + ", ".join(f"{k} {v:+g}" for k, v in ensemble["entity_bias"].items())
                  + (f". {ensemble['entity_bias_how']}" if ensemble.get("entity_bias_how") else ".")]
    lines += ["", "| file | largest difference from the members' weighted mean | argmax agreement |", "|---|---|---|",
              *(f"| {name} | {p.get('max_abs_diff'):.1e} | {p.get('argmax_agreement')} |"
                for name, p in (ensemble.get("parity") or {}).items()), ""]
    return lines


def _teacher(results: dict[str, Any]) -> list[str]:
    teacher = results.get("teacher")
    if not isinstance(teacher, dict):
        return []
    return [f"Distilled: it also learnt the predictions of `{teacher.get('model')}` (share of the loss "
            f"{teacher.get('weight')}, temperature {teacher.get('temperature')}).", ""]


def _metrics(results: dict[str, Any], task: str) -> list[str]:
    lines = ["## Validation metrics", "", "| metric | value |", "|---|---|",
             *(f"| {k} | {v:.4f} |" for k, v in results.get("metrics", {}).items()), ""]
    token = _head(task) == "token"
    if token:
        lines += ["Token metrics are weighted over entity tags (`O` excluded); `entity_*` are seqeval "
                  "entity-level scores (a span counts only when type and boundaries both match).", ""]
    table = results.get("per_class") or results.get("per_type")
    if table:
        lines += [f"| {'entity type' if token else 'class'} | precision | recall | f1 | support |",
                  "|---|---|---|---|---|",
                  *(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
                    for name, r in table.items()), ""]
    return lines


def _export(results: dict[str, Any]) -> list[str]:
    export = results.get("export") or {}
    parity = [(k, export[k]) for k in _EXPORT_KEYS if k in export]
    if not parity:
        return []
    calibration = export.get("int8_calibration")
    if isinstance(calibration, dict):
        parity.append(("int8_calibration", f"{calibration.get('texts')} texts from "
                                           f"{', '.join(map(str, calibration.get('sources') or []))}"))
    return ["## Export", "", "ONNX files checked against the PyTorch logits on fixed texts (int8_batch_max_diff: "
            "a text's logits alone against the same text in a padded batch):", "",
            "| check | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in parity), ""]


def _yardsticks(results: dict[str, Any]) -> list[str]:
    """What a build recipe adds to eval_results.json (models/build.py): scores as served on held-out sets,
    the baselines beside them, and notes on any shortfall."""
    served = results.get("served") or {}
    sequence = _head(results.get("task", "category")) == "sequence"
    lines = _served_category(served, results) if sequence else _served_pii(served, results)
    notes = results.get("notes")
    if notes:
        lines += ["## How far it is from its targets", "", *(f"- {n}" for n in notes), ""]
    return lines


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "-"


def _served_category(served: dict[str, Any], results: dict[str, Any]) -> list[str]:
    sets = {k: v for k, v in served.items() if isinstance(v, dict) and "accuracy" in v}
    if not sets:
        return []
    fp32, base = results.get("fp32") or {}, results.get("baseline") or {}
    teacher = results.get("teacher_not_served") or {}
    lines = ["## Accuracy as served (INT8 through the sidecar's Engine, held-out sets)", "",
             f"Baseline: {base.get('model', '-')}, trained on the same {base.get('train_rows', '?')} rows.",
             *([f"Teacher (not served): {teacher['model']}."] if teacher.get("model") else []), "",
             "| held-out set | rows | served | fp32 | baseline | teacher | routed at the threshold | accuracy there |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sets.items():
        at = r.get("at_routing_threshold") or {}
        lines.append(f"| {name} | {r.get('examples', '?')} | {_pct(r['accuracy'])} | "
                     f"{_pct((fp32.get(name) or {}).get('accuracy'))} | {_pct((base.get(name) or {}).get('accuracy'))} "
                     f"| {_pct((teacher.get(name) or {}).get('accuracy'))} "
                     f"| {_pct(at.get('coverage'))} | {_pct(at.get('accuracy'))} |")
    lines.append("")
    for name, r in sets.items():
        lines += [f"Accuracy against coverage ({name}): the router keeps a category at or above the threshold, "
                  "the rest go to the default model.", "", "| threshold | coverage | accuracy |", "|---|---|---|",
                  *(f"| {c['threshold']} | {_pct(c['coverage'])} | {_pct(c['accuracy'])} |"
                    for c in r.get("coverage", [])), ""]
    return lines


def _served_pii(served: dict[str, Any], results: dict[str, Any]) -> list[str]:
    base = results.get("baseline_recognizers_only") or {}
    teacher = results.get("teacher_not_served") or {}
    labelled = {k: v for k, v in served.items() if "entities" in v}
    clean = {k: v for k, v in served.items() if "with_any_mask" in v}
    if not labelled and not clean:
        return []
    lines = ["## Caught as served (INT8, recognizers beside it, the default policy; held-out sets)", "",
             "An identifying entity (not a context type: LOCATION, ORGANIZATION, DATE_TIME, NRP, TITLE, PREFIX, "
             "DOMAIN_NAME) is caught when every non-space character of it is masked. Baseline: the recognizers "
             "alone (no model).", *([f"Teacher (not served): {teacher['model']}."] if teacher.get("model") else []), "",
             "| held-out set | texts | entities | caught | baseline | teacher | type right | texts with a false mask "
             "| same spans alone |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in labelled.items():
        lines.append(f"| {name} | {r['texts']} | {r['entities']} | {_pct(r['caught'])} | "
                     f"{_pct((base.get(name) or {}).get('caught'))} | {_pct((teacher.get(name) or {}).get('caught'))} "
                     f"| {_pct(r.get('type_right'))} | "
                     f"{_pct(r.get('texts_with_false_mask'))} | {_pct(r.get('same_spans_alone'))} |")
    lines += ["", "| PII-free set | texts | any mask | a person, contact or number mask | baseline | teacher |",
              "|---|---|---|---|---|---|"]
    for name, r in clean.items():
        key = "with_person_contact_or_number_mask"
        lines.append(f"| {name} | {r['texts']} | {_pct(r['with_any_mask'])} | {_pct(r[key])} | "
                     f"{_pct((base.get(name) or {}).get(key))} | {_pct((teacher.get(name) or {}).get(key))} |")
    lines.append("")
    for name, r in labelled.items():
        lines += [f"Per type ({name}):", "", "| entity type | entities | caught |", "|---|---|---|",
                  *(f"| {k} | {v['entities']} | {_pct(v['caught'])} |" for k, v in r.get("per_type", {}).items()), ""]
    return lines


def _validation(data: dict[str, Any]) -> str:
    if data.get("validation"):
        return ", ".join(data["validation"])
    return f"a {data.get('validation_from', 'held-out split')} of the training data"


def write_card(model_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(model_dir) / CARD_FILE
    path.write_text(render_card(results), encoding="utf-8")
    return path
