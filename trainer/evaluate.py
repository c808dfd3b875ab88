"""Metrics for both tasks, used during training (`trainer evaluate` scores the served model: trainer.served).

Category: accuracy and weighted precision/recall/F1 (sklearn), a per-class table and a confusion matrix.
PII: token accuracy, token precision/recall/F1 weighted over the entity tags (``O`` left out, or a model
that predicts nothing would look good), and entity-level precision/recall/F1 overall and per type (seqeval).
Everything is computed offline; nothing is fetched.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import OUTSIDE, SpanExample, TextExample
from trainer.preprocess import IGNORE_INDEX, encode_category, encode_pii, without_overlap

# --- metrics ---------------------------------------------------------------------------------------


def category_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="weighted", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
    }


def pii_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score
    from sklearn.metrics import precision_recall_fscore_support

    flat_true = [t for seq in true_tags for t in seq]
    flat_pred = [t for seq in pred_tags for t in seq]
    entity_tags = sorted({t for t in flat_true + flat_pred if t != OUTSIDE})
    if entity_tags:
        precision, recall, f1, _ = precision_recall_fscore_support(
            flat_true, flat_pred, labels=entity_tags, average="weighted", zero_division=0
        )
    else:
        precision = recall = f1 = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns about classes with no predictions
        entity = {
            "entity_precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
            "entity_recall": float(recall_score(true_tags, pred_tags, zero_division=0)),
            "entity_f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
        }
    accuracy = sum(t == p for t, p in zip(flat_true, flat_pred, strict=True)) / max(len(flat_true), 1)
    return {"accuracy": accuracy, "f1": float(f1), "precision": float(precision), "recall": float(recall), **entity}


def category_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Overall metrics, a per-class table and the confusion matrix (rows: true, columns: predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        "metrics": category_metrics(y_true, y_pred),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": list(labels), "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
    }


def pii_report(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Overall metrics and the entity-level table per type."""
    from seqeval.metrics import classification_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {
        name: {
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "f1": float(row["f1-score"]),
            "support": int(row["support"]),
        }
        for name, row in table.items()
        if not name.endswith(" avg")
    }
    return {"metrics": pii_metrics(true_tags, pred_tags), "per_type": dict(sorted(per_type.items()))}


def tags_from_ids(
    label_ids: Sequence[Sequence[int]], pred_ids: Sequence[Sequence[int]], id2label: dict[int, str]
) -> tuple[list[list[str]], list[list[str]]]:
    """True and predicted tag sequences, keeping only positions with a label (not ``IGNORE_INDEX``)."""
    true_tags, pred_tags = [], []
    for labels, preds in zip(label_ids, pred_ids, strict=True):
        keep = [(int(t), int(p)) for t, p in zip(labels, preds, strict=False) if t != IGNORE_INDEX]
        true_tags.append([id2label[t] for t, _ in keep])
        pred_tags.append([id2label[p] for _, p in keep])
    return true_tags, pred_tags


# --- inference -------------------------------------------------------------------------------------


def batched_logits(model, tokenizer, input_ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
    """Unpadded logits per input, batched by length, in input order."""
    import torch

    model.eval()
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    out: list[np.ndarray | None] = [None] * len(input_ids)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            padded = tokenizer.pad(
                {"input_ids": [input_ids[i] for i in batch]}, padding=True, return_tensors="pt"
            ).to(model.device)
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            logits = logits.float().cpu().numpy()
            for row, i in enumerate(batch):
                out[i] = logits[row] if logits.ndim == 2 else logits[row, : len(input_ids[i])]
    return out  # type: ignore[return-value]


def evaluate_category(
    model, tokenizer, examples: Sequence[TextExample], max_length: int, batch_size: int = 32
) -> dict[str, Any]:
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    labels = [id2label[i] for i in range(len(id2label))]
    enc = encode_category(tokenizer, examples, {label: i for i, label in enumerate(labels)}, max_length)
    logits = batched_logits(model, tokenizer, enc["input_ids"], batch_size)
    y_pred = [int(np.argmax(row)) for row in logits]
    return {"examples": len(examples), **category_report(enc["labels"], y_pred, labels)}


def evaluate_pii(
    model, tokenizer, examples: Sequence[SpanExample], max_length: int, stride: int, batch_size: int = 32
) -> dict[str, Any]:
    """Windows are predicted separately and joined back per text, each token counted once."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    windows = encode_pii(tokenizer, examples, {v: k for k, v in id2label.items()}, max_length, stride)
    logits = batched_logits(model, tokenizer, windows.input_ids, batch_size)
    true_ids: list[list[int]] = [[] for _ in examples]
    pred_ids: list[list[int]] = [[] for _ in examples]
    for k, index in enumerate(windows.example):
        true_ids[index].extend(without_overlap(windows.labels[k], windows.overlap[k]))
        pred_ids[index].extend(int(p) for p in np.argmax(logits[k], axis=-1))
    true_tags, pred_tags = tags_from_ids(true_ids, pred_ids, id2label)
    return {"examples": len(examples), "windows": len(windows), **pii_report(true_tags, pred_tags)}


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
    """A fixed-width precision/recall/F1/support table."""
    width = max([len(title), *map(len, rows)])
    lines = [f"{title:<{width}}  precision  recall      f1  support"]
    for name, row in rows.items():
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:6.3f}  {row['support']:7d}"
        )
    return "\n".join(lines)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path) -> Path:
    """A row-normalised confusion matrix (counts written in the cells) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
