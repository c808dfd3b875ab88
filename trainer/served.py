"""Scores of a model directory as the sidecar serves it, for ``trainer evaluate``.

Every text goes through the sidecar's own decision code (`DecisionMaker.decide_texts`): the engine and backend
the sidecar would open (``runtime: auto`` takes ``model.int8.onnx`` on CPU), its windows, the pattern and
checksum recognizers beside the model, and the default PII policy (score threshold, context types let
through). The numbers are therefore those of what production runs, and a directory with only ONNX files
can be scored. Shares are rounded to four places; a share of nothing is None.

PII is scored the way a leak is judged, not by tag overlap: an identifying entity (a gold type outside
``CONTEXT_ENTITIES``) is caught when every non-space character of it is masked, by a span of any label;
a mask is false where it covers a letter or digit outside every gold span (the comma a mask takes between two
labelled parts of one address hides nothing).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model_contract.model_dir import TASK_CATEGORY, ModelDir
from sidecar.config import (
    CONTEXT_ENTITIES,
    Config,
    ModelConfig,
    ModelsConfig,
    PiiConfig,
    PiiPolicyConfig,
    RoutingConfig,
)
from sidecar.decisions import DecisionMaker, TextDecision
from sidecar.inference.engine import Engine
from trainer.data import DataError, check_known_labels, load_category, load_spans
from trainer.evaluate import format_table
from trainer.settings import UsageError

THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
BATCH = 256
"""Texts per `decide_texts` call: enough to fill the batcher's passes, few enough to bound memory."""
NO_CATEGORY = "(none)"
"""The prediction for a text that got no category (an empty text)."""


@contextmanager
def served_router(category: str | Path | None = None, pii: str | Path | None = None, runtime: str = "auto",
                  policy: PiiPolicyConfig | None = None, *, max_length: int | None = None,
                  stride: int | None = None, entity_bias: Mapping[str, float] | None = None,
                  ) -> Iterator[DecisionMaker]:
    """A DecisionMaker over the engine the sidecar would load for these model directories (patterns beside the
    model, checksums on, default routing), closed on the way out. `policy` replaces the default PII policy;
    `max_length`/`stride`/`entity_bias` are the ``models.*`` settings (None: the sidecar's defaults). A
    category model reads its first window only, so its stride is 0: the default 64 would refuse a window under
    67."""
    config = Config(
        models=ModelsConfig(category=_model(category, runtime, max_length, 0),
                            pii=_model(pii, runtime, max_length, stride, entity_bias)),
        routing=RoutingConfig(default_model="default"),
        pii=PiiConfig(patterns="always", checksums=True, default_policy=policy or PiiPolicyConfig()),
    )
    engine = Engine.load(config.models, config.batching, checksums=config.pii.checksums)
    try:
        yield DecisionMaker(config, engine)
    finally:
        engine.close()


def _model(path: str | Path | None, runtime: str, max_length: int | None, stride: int | None,
           entity_bias: Mapping[str, float] | None = None) -> ModelConfig | None:
    """The ``models.*`` section for `path`; bad settings are a usage error, as in a config file."""
    if path is None:
        return None
    window = {"max_length": max_length} | ({"stride": stride} if stride is not None else {})
    try:
        return ModelConfig(path=str(path), runtime=runtime, entity_bias=dict(entity_bias or {}), **window)
    except ValidationError as e:
        raise UsageError(f"model settings: {e.errors()[0]['msg']}") from None


def decide(router: DecisionMaker, texts: Sequence[str], batch: int = BATCH) -> list[TextDecision]:
    """`decide_texts` in chunks of `batch` texts (one call for a million texts would hold them all twice)."""
    out: list[TextDecision] = []
    for at in range(0, len(texts), batch):
        out += router.decide_texts(texts[at : at + batch])
    return out


# --- category ----------------------------------------------------------------------------------------


def score_category(router: DecisionMaker, rows: Sequence[dict], thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """Accuracy, weighted F1, per-class table and confusion matrix of the served categories, and how the
    confidence threshold trades coverage (share of rows routed by their category) for accuracy."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    if router.engine.category_labels is None:
        raise UsageError("no category model is loaded")
    decisions = decide(router, [r["text"] for r in rows])
    gold = [r["label"] for r in rows]
    pred = [d.category if d.category is not None else NO_CATEGORY for d in decisions]
    confidence = [d.confidence or 0.0 for d in decisions]
    right = [g == p for g, p in zip(gold, pred, strict=True)]
    labels = router.engine.category_labels
    labels += sorted(set(gold + pred) - set(labels))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    return {
        "examples": len(rows),
        "accuracy": _share(sum(right), len(rows)),
        "f1_weighted": round(float(f1_score(gold, pred, labels=labels, average="weighted", zero_division=0)), 4),
        "per_class": {label: {"precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4),
                              "f1": round(float(f[i]), 4), "support": int(s[i])}
                      for i, label in enumerate(labels)},
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(gold, pred, labels=labels).tolist()},
        "coverage": [_coverage(right, confidence, t) for t in thresholds],
        "at_routing_threshold": _coverage(right, confidence, router.config.routing.confidence_threshold),
    }


def _coverage(right: Sequence[bool], confidence: Sequence[float], threshold: float) -> dict[str, Any]:
    """Share of rows at or above `threshold` (the ones routed by category) and the accuracy on them."""
    kept = [ok for ok, c in zip(right, confidence, strict=True) if c >= threshold]
    return {"threshold": threshold, "coverage": _share(len(kept), len(right)), "accuracy": _share(sum(kept), len(kept))}


# --- PII ---------------------------------------------------------------------------------------------


def score_pii(router: DecisionMaker, rows: Sequence[dict]) -> dict[str, Any]:
    """Catch rate of identifying entities (overall and per type), whether the catching span has the right
    type, false masks; and, for rows with ``inner`` (the PII sentence's [start, end) in a longer text),
    whether the sentence alone gets the same kept spans as inside the longer text (windows, context)."""
    texts = [r["text"] for r in rows]
    inner = [(i, r["inner"]) for i, r in enumerate(rows) if r.get("inner") is not None]
    decisions = decide(router, texts + [texts[i][start:end] for i, (start, end) in inner])
    entities, caught, typed = Counter(), Counter(), 0
    false_texts = masked_chars = false_chars = 0
    for row, decision in zip(rows, decisions[: len(rows)], strict=True):
        text, kept = row["text"], decision.pii
        masked, gold = _chars(text, kept), _chars(text, row["spans"])
        for entity in row["spans"]:
            label, chars = entity["label"], _chars(text, [entity])
            if label in CONTEXT_ENTITIES or not chars:
                continue
            entities[label] += 1
            if chars <= masked:
                caught[label] += 1
                first = min(chars)
                typed += any(s["start"] <= first < s["end"] and s["label"] == label for s in kept)
        readable = {i for i in masked if text[i].isalnum()}
        false = readable - gold
        false_texts += bool(false)
        masked_chars += len(readable)
        false_chars += len(false)
    report = {
        "texts": len(rows),
        "entities": sum(entities.values()),
        "caught": _share(sum(caught.values()), sum(entities.values())),
        "type_right": _share(typed, sum(caught.values())),
        "per_type": {k: {"entities": n, "caught": _share(caught[k], n)} for k, n in entities.most_common()},
        "texts_with_false_mask": _share(false_texts, len(rows)),
        "false_mask_char_share": _share(false_chars, masked_chars),
    }
    if inner:
        alone = decisions[len(rows):]
        same = sum(_same_spans(decisions[i].pii, a.pii, start, end) for (i, (start, end)), a in zip(inner, alone, strict=True))
        report |= {"inner_texts": len(inner), "same_spans_alone": _share(same, len(inner))}
    return report


def _chars(text: str, spans: Sequence[dict]) -> set[int]:
    """Positions of the non-space characters the spans cover (spacing masked or not changes nothing)."""
    return {i for s in spans for i in range(s["start"], s["end"]) if not text[i].isspace()}


def _same_spans(full: Sequence[dict], alone: Sequence[dict], start: int, end: int) -> bool:
    """Whether the kept spans of ``text[start:end]`` alone are those of the full text inside [start, end)."""
    inside = {(s["start"] - start, s["end"] - start, s["label"]) for s in full if start <= s["start"] and s["end"] <= end}
    return inside == {(s["start"], s["end"], s["label"]) for s in alone}


def score_clean(router: DecisionMaker, texts: Sequence[str]) -> dict[str, Any]:
    """On texts with no PII: how often anything is masked, how often an identifying type (a name, contact or
    number, not a context type), and which labels."""
    labels = [[s["label"] for s in d.pii] for d in decide(router, texts)]
    identifying = sum(any(label not in CONTEXT_ENTITIES for label in found) for found in labels)
    return {
        "texts": len(texts),
        "with_any_mask": _share(sum(bool(found) for found in labels), len(texts)),
        "with_person_contact_or_number_mask": _share(identifying, len(texts)),
        "by_label": dict(Counter(label for found in labels for label in found).most_common()),
    }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# --- a model directory on labelled data ------------------------------------------------------------


def evaluate_served(model_dir: str | Path, sources: Sequence[str], runtime: str = "auto", text_column: str = "text",
                    label_column: str = "label", split: str = "train", *, max_length: int | None = None,
                    stride: int | None = None, drop_unknown_labels: bool = False,
                    policy: PiiPolicyConfig | None = None, entity_bias: Mapping[str, float] | None = None,
                    ) -> dict[str, Any]:
    """Score a model directory as served on labelled data (category rows, or span rows for PII); the report
    says which runtime and window were served."""
    md = ModelDir.read(model_dir)
    category = md.task == TASK_CATEGORY
    dropped = 0
    if category:
        rows, dropped = _category_rows(sources, md.labels, text_column, label_column, split, drop_unknown_labels)
    else:
        rows = [{"text": e.text, "spans": [{"start": s.start, "end": s.end, "label": s.label} for s in e.spans]}
                for source in sources for e in load_spans(source, split)]
    paths = (md.path, None) if category else (None, md.path)
    with served_router(*paths, runtime, policy, max_length=max_length, stride=stride,
                       entity_bias=entity_bias) as router:
        served = router.engine.describe()[md.task]
        scores = score_category(router, rows) if category else score_pii(router, rows)
    task = {"dropped_unknown_labels": dropped} if category else \
        {"stride": served["stride"], "entity_bias": served["entity_bias"]}
    return {"task": md.task, "model": str(md.path), "data": [str(s) for s in sources], "runtime": served["runtime"],
            "file": Path(served["file"]).name, "max_length": served["max_length"], **task, **scores}


def _category_rows(sources: Sequence[str], labels: list[str], text_column: str, label_column: str, split: str,
                   drop_unknown: bool) -> tuple[list[dict], int]:
    """Rows whose labels the model has: the others fail, or are dropped (and counted) when asked."""
    examples = [e for s in sources for e in load_category(s, text_column, label_column, split)]
    if not drop_unknown:
        check_known_labels(examples, labels, "the model's labels")
    rows = [{"text": e.text, "label": e.label} for e in examples if e.label in labels]
    if not rows:
        raise DataError(", ".join(map(str, sources)), None, "no rows left with labels the model knows")
    return rows, len(examples) - len(rows)


def format_report(report: dict[str, Any]) -> str:
    """The report for a terminal: headline numbers, then the per-class or per-type table."""
    keys = ("accuracy", "f1_weighted") if report["task"] == TASK_CATEGORY else \
        ("caught", "type_right", "texts_with_false_mask", "false_mask_char_share", "same_spans_alone")
    head = [f"{k}={_num(report[k])}" for k in keys if k in report]
    lines = ["  ".join([*head, f"runtime={report['runtime']}", f"max_length={report['max_length']}"])]
    if report["task"] == TASK_CATEGORY:
        lines.append(format_table(report["per_class"], "class"))
        routing, rows = report["at_routing_threshold"], report["coverage"]
        rows = rows if any(c["threshold"] == routing["threshold"] for c in rows) else [*rows, routing]
        for c in rows:
            mark = "  <- routing threshold" if c["threshold"] == routing["threshold"] else ""
            lines.append(f"confidence >= {c['threshold']:.2f}: coverage {_num(c['coverage'])}  "
                         f"accuracy {_num(c['accuracy'])}{mark}")
    else:
        width = max([len("entity type"), *map(len, report["per_type"])])
        lines.append(f"{'entity type':<{width}}  entities  caught")
        lines += [f"{k:<{width}}  {v['entities']:8d}  {_num(v['caught']):>6}" for k, v in report["per_type"].items()]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
