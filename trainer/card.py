"""The model card (``README.md``), written from ``eval_results.json`` so it never disagrees with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
_EXPORT_KEYS = ("onnx_max_abs_diff", "onnx_argmax_agreement", "onnx_bytes",
                "int8_max_abs_diff", "int8_argmax_agreement", "int8_bytes")
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


def render_card(results: dict[str, Any]) -> str:
    task = results.get("task", "category")
    data = results.get("data", {})
    settings = results.get("settings", {})
    training = results.get("training", {})
    metrics = results.get("metrics", {})
    hardware = results.get("hardware", {})
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text-classification' if task == 'category' else 'token-classification'}",
        f"base_model: {results.get('base_model', 'unknown')}",
        "tags: [modernbert, semantic-sidecar]",
        "---",
        "",
        f"# semantic-sidecar {task} model",
        "",
        _PURPOSE.get(task, ""),
        "",
        "## Data",
        "",
        f"- Training data: {', '.join(data.get('train', [])) or 'unknown'} "
        f"({data.get('train_examples', '?')} examples"
        + (f", {data['train_windows']} windows" if "train_windows" in data else "")
        + ")",
        f"- Validation data: {_validation(data)} ({data.get('validation_examples', '?')} examples)",
        f"- Labels ({len(results.get('labels', []))}): {', '.join(results.get('labels', []))}",
        "",
        "## Training",
        "",
        f"Fine-tuned from `{results.get('base_model', 'unknown')}` with the Hugging Face Trainer on "
        f"{hardware.get('name', 'unknown device')}; the best checkpoint by validation "
        f"weighted F1 was kept (early stopping).",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in settings.items() if k not in _HARDWARE_SETTINGS),
        f"| fp16 | {hardware.get('fp16', '?')} |",
        f"| gradient checkpointing | {hardware.get('gradient_checkpointing', '?')} |",
        f"| steps run | {training.get('steps', '?')} (stopped early: {training.get('stopped_early', '?')}) |",
        f"| time | {results.get('time', {}).get('total_seconds', '?')} s |",
        "",
        "## Validation metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in metrics.items()),
        "",
    ]
    if task == "pii":
        lines.append("Token metrics are weighted over entity tags (`O` excluded); `entity_*` are seqeval "
                     "entity-level scores (a span counts only when type and boundaries both match).")
        lines.append("")
    table = results.get("per_class") or results.get("per_type")
    if table:
        lines += [
            f"| {'class' if task == 'category' else 'entity type'} | precision | recall | f1 | support |",
            "|---|---|---|---|---|",
            *(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
              for name, r in table.items()),
            "",
        ]
    export = results.get("export") or {}
    parity = [(k, export[k]) for k in _EXPORT_KEYS if k in export]
    if parity:
        lines += ["## Export", "", "ONNX files checked against the PyTorch logits on fixed texts:", "",
                  "| check | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in parity), ""]
    lines += _yardsticks(results)
    lines += [
        "## Intended use",
        "",
        "Serving inside semantic-sidecar from this directory (`config.json` carries the labels and "
        "`sidecar_task`; `model.onnx`/`model.int8.onnx` when exported). Not for decisions about people.",
        "",
        "## Limits",
        "",
        *(f"- {item}" for item in _LIMITS.get(task, [])),
        "",
    ]
    return "\n".join(lines)


def _yardsticks(results: dict[str, Any]) -> list[str]:
    """Sections a build recipe may add to eval_results.json: a baseline, the served runtimes' accuracy,
    the PII catch rate through the sidecar, and notes on any shortfall."""
    lines: list[str] = []
    served = results.get("served_accuracy")
    if served:
        lines += ["## Accuracy as served (sidecar engine, validation set)", "",
                  "| runtime | accuracy | weighted F1 |", "|---|---|---|",
                  *(f"| {rt} | {r['accuracy']:.4f} | {r['f1_weighted']:.4f} |" for rt, r in served.items()), ""]
    baseline = results.get("baseline")
    if baseline:
        lines += ["## Baseline on the same rows", "",
                  f"{baseline['model']}, trained on the same {baseline['train_rows']} rows and scored on the "
                  f"same {baseline['validation_rows']} validation rows: accuracy {baseline['accuracy']:.4f}, "
                  f"weighted F1 {baseline['f1_weighted']:.4f}.", ""]
    routing = results.get("confidence_threshold")
    if routing:
        lines += ["## Confidence threshold (router fallback to the default model)", "",
                  "| threshold | share routed by category | accuracy of those |", "|---|---|---|",
                  *(f"| {t} | {r['coverage']:.3f} | {r['accuracy']:.4f} |" for t, r in routing.items()), ""]
    catch = results.get("catch_rate")
    if catch:
        lines += ["## Catch rate through the sidecar", "",
                  "An entity is caught when every non-space character of it is masked under the default "
                  "policy (score threshold included); false masks are masked characters outside every "
                  "labelled entity.", ""]
        for mode, sources in catch.items():
            for source, r in sources.items():
                lines += [f"**{source}, {mode.replace('_', ' ')}**: {r['caught']:.1%} of {r['entities']} "
                          f"entities caught; {r['false_mask_char_share']:.1%} of masked characters are false "
                          "masks.", "",
                          "| entity type | entities | caught |", "|---|---|---|",
                          *(f"| {k} | {v['entities']} | {v['caught']:.1%} |" for k, v in r["per_type"].items()),
                          ""]
    clean = results.get("false_masks_on_questions")
    if clean:
        lines += ["## False masks on ordinary text", "",
                  f"On {clean['texts']} held-out exam questions with no PII: {clean['texts_with_a_mask']:.1%} get "
                  f"any mask, {clean['spans_per_text']:.2f} spans per question, {clean['masked_char_share']:.2%} "
                  "of characters masked.", ""]
    notes = results.get("notes")
    if notes:
        lines += ["## How far it is from its targets", "", *(f"- {n}" for n in notes), ""]
    return lines


def _validation(data: dict[str, Any]) -> str:
    if data.get("validation"):
        return ", ".join(data["validation"])
    return f"a {data.get('validation_from', 'held-out split')} of the training data"


def write_card(model_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(model_dir) / CARD_FILE
    path.write_text(render_card(results), encoding="utf-8")
    return path
