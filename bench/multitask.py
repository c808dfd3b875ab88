"""One shared encoder pass for both heads: does a multi-task model keep the accuracy of two single-task ones?

The sidecar runs a category model on the latest user message and a PII model on every scanned message:
for the usual chat request (system prompt + question) the question is read twice, once by each model. A
model with one ModernBERT encoder and both heads (mean-pooled category head, token head) would read it
once. This script trains that model with the bundled models' recipe, from the same masked-LM encoder, on
the same rows (`make models` builds them under build/models), scores each head with the trainer's own
evaluation on the same held-out splits, and sets the result beside the single-task models and against
the inference time a shared pass would save on the Envoy benchmark's request mix.

Training is the Hugging Face Trainer on the union of both data sets: a category row contributes the
sequence loss, a PII window the token loss (the other label is ignored), summed per batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable like under `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DATA, FULL_MODELS, RESULTS, log, machine, write_json

IGNORE = -100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", type=Path, default=FULL_MODELS / "encoder",
                   help="masked-LM encoder both heads start from (the --single models should be fine-tuned from "
                        "it too; the bundled category model now starts from build/models/encoder-medium)")
    p.add_argument("--data", type=Path, default=DATA, help="the splits `make models` wrote")
    p.add_argument("--single", type=Path, default=FULL_MODELS,
                   help="folder with the single-task category/ and pii/ model directories to compare with")
    p.add_argument("--work", type=Path, default=FULL_MODELS / "multitask", help="where the two heads are saved")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="cap on optimiser steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=4e-4,
                   help="between the single-task runs' 3e-4 (category) and 5e-4 (PII)")
    p.add_argument("--pii-weight", type=float, default=1.0, help="weight of the token loss against the category loss")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=None, help="rows per data file (smoke tests)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=RESULTS / "multitask.json")
    return p.parse_args(argv)


def build(encoder: Path, category_labels: list[str], pii_labels: list[str], pii_weight: float = 1.0):
    """The two single-task HF models with the category model's encoder shared by both, and the training
    module around them. Each stays a complete model, so evaluation and saving are the trainer's own."""
    import torch
    from torch import nn
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    def labelled(cls, labels):
        return cls.from_pretrained(encoder, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                   label2id={label: i for i, label in enumerate(labels)})

    category = labelled(AutoModelForSequenceClassification, category_labels)
    pii = labelled(AutoModelForTokenClassification, pii_labels)
    pii.model = category.model  # one encoder; the token model's own copy is dropped

    class MultiTask(nn.Module):
        def __init__(self):
            super().__init__()
            self.category = category
            self.pii_head = nn.ModuleList([pii.head, pii.drop, pii.classifier])

        def forward(self, input_ids, attention_mask, labels=None, token_labels=None):
            hidden = category.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)  # ModernBERT's "mean" classifier pooling
            category_logits = category.classifier(category.drop(category.head(pooled)))
            token_logits = pii.classifier(pii.drop(pii.head(hidden)))
            loss = None
            if labels is not None:
                loss = _mean_ce(category_logits, labels) + pii_weight * _mean_ce(token_logits.flatten(0, 1),
                                                                                token_labels.flatten())
            return {"loss": loss, "category_logits": category_logits, "token_logits": token_logits}

    def _mean_ce(logits, target):
        """Cross-entropy over the rows that have a label; 0 when none has (a batch of the other task)."""
        keep = target != IGNORE
        if not keep.any():
            return logits.sum() * 0.0
        return torch.nn.functional.cross_entropy(logits[keep], target[keep])

    return AutoTokenizer.from_pretrained(encoder), category, pii, MultiTask()


def features(tokenizer, category_data, pii_data, max_length: int, stride: int) -> list[dict]:
    """Training rows of both tasks: category rows carry ``labels``, PII windows ``token_labels``."""
    from trainer.preprocess import encode_category, encode_pii

    label2id = {label: i for i, label in enumerate(category_data.labels)}
    cat = encode_category(tokenizer, category_data.train, label2id, max_length)
    rows = [{"input_ids": ids, "labels": label, "token_labels": [IGNORE] * len(ids)}
            for ids, label in zip(cat["input_ids"], cat["labels"], strict=True)]
    tag2id = {label: i for i, label in enumerate(pii_data.labels)}
    windows = encode_pii(tokenizer, pii_data.train, tag2id, max_length, stride)
    rows += [{"input_ids": ids, "labels": IGNORE, "token_labels": labels}
             for ids, labels in zip(windows.input_ids, windows.labels, strict=True)]
    return rows


def collate(pad_id: int):
    import torch

    def pad(rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        tokens = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            tokens[i, :n] = torch.tensor(r["token_labels"])
        return {"input_ids": ids, "attention_mask": mask, "token_labels": tokens,
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long)}

    return pad


def load_data(data: Path, max_samples: int | None, seed: int):
    from trainer.data import load_task_data

    def files(*names: str) -> list[str]:
        return [str(data / f"{n}.jsonl") for n in names]

    category = load_task_data("category", files("category_train"), files("category_val"), seed=seed)
    pii = load_task_data("pii", files("synth_train", "presidio_train", "clean_train"),
                         files("presidio_val", "synth_val", "clean_val"), seed=seed)
    if max_samples:  # labels stay those of all the rows, as in the single-task models
        category, pii = (dataclasses.replace(d, train=d.train[:max_samples], validation=d.validation[:max_samples])
                         for d in (category, pii))
    return category, pii


def single_task(single: Path) -> dict:
    """The single-task models' validation metrics (PyTorch, fp32), as their training runs recorded them."""
    out = {}
    for task in ("category", "pii"):
        path = single / task / "eval_results.json"
        metrics = json.loads(path.read_text()).get("metrics") if path.is_file() else None
        if metrics:
            out[task] = metrics
    return out


def pass_savings(tokenizer, data: Path) -> dict:
    """Tokens the two served models read per request of the Envoy benchmark's mix (windows of 512
    tokens, the sidecar's default for a model that does not say what it was trained at), against a shared model: the category window of the latest user message
    is that message's first PII window, so a shared pass reads only the PII windows."""
    from bench.common import corpus_texts
    from bench.envoy import request_bodies
    from sidecar.inference.windows import DEFAULT_STRIDE, DEFAULT_WINDOW, window_starts

    window, stride = DEFAULT_WINDOW, DEFAULT_STRIDE
    room = window - 2
    bodies = request_bodies(64, corpus_texts([data / "category_val.jsonl"]),
                            corpus_texts([data / "synth_val.jsonl"], fallback=False))
    separate = shared = 0
    for body in bodies:
        messages = json.loads(body)["messages"]
        lengths = [len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages]
        pii = sum(min(n - start, room) + 2 for n in lengths for start in window_starts(n, room, stride))
        separate += pii + min(lengths[-1], room) + 2
        shared += pii
    return {"requests": len(bodies), "window_tokens": window,
            "tokens_per_request_separate": round(separate / len(bodies), 1),
            "tokens_per_request_shared": round(shared / len(bodies), 1),
            "share_saved": round(1 - shared / max(separate, 1), 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from trainer.evaluate import evaluate_category, evaluate_pii

    set_seed(args.seed)
    started = time.perf_counter()
    category_data, pii_data = load_data(args.data, args.max_samples, args.seed)
    tokenizer, category, pii, model = build(args.encoder, category_data.labels, pii_data.labels, args.pii_weight)
    rows = features(tokenizer, category_data, pii_data, args.max_length, args.stride)
    log(f"training one encoder with both heads on {len(category_data.train)} category rows and "
        f"{len(rows) - len(category_data.train)} PII windows")
    train_args = TrainingArguments(
        output_dir=str(args.work / "checkpoints"), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, weight_decay=0.01,
        warmup_steps=0.06, lr_scheduler_type="linear", save_strategy="no", eval_strategy="no",
        logging_steps=50, report_to="none", seed=args.seed, remove_unused_columns=False,
        fp16=torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=train_args, train_dataset=rows, data_collator=collate(tokenizer.pad_token_id))
    result = trainer.train()
    train_s = time.perf_counter() - started

    batch = args.batch_size * 2
    cat_report = evaluate_category(category, tokenizer, category_data.validation, args.max_length, batch)
    pii_report = evaluate_pii(pii, tokenizer, pii_data.validation, args.max_length, args.stride, batch)
    for view, name in ((category, "category"), (pii, "pii")):
        view.config.sidecar_task = name
        view.save_pretrained(args.work / name)
        tokenizer.save_pretrained(args.work / name)
    single = single_task(args.single)
    multi = {"category": cat_report["metrics"], "pii": pii_report["metrics"]}
    compare = {}
    for task, keys in (("category", ("accuracy", "f1")), ("pii", ("entity_f1", "f1"))):
        if task in single:
            compare[task] = {k: {"single": round(single[task][k], 4), "shared": round(multi[task][k], 4),
                                 "points": round((multi[task][k] - single[task][k]) * 100, 2)} for k in keys}
    keeps = all(abs(v["points"]) <= 1.0 or v["points"] > 0 for c in compare.values() for v in c.values()) if compare else None
    results = {
        "bench": "multitask",
        "machine": machine("cuda" if torch.cuda.is_available() else "cpu"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"category_train": len(category_data.train), "pii_train_windows": len(rows) - len(category_data.train),
                 "category_validation": len(category_data.validation), "pii_validation": len(pii_data.validation)},
        "training": {"steps": trainer.state.global_step, "train_loss": round(float(result.training_loss), 4),
                     "seconds": round(train_s, 1)},
        "shared": multi,
        "single": single,
        "compare": compare,
        "keeps_accuracy": keeps,
        "rule": "kept when every head is within 1 point of its single-task model (or better), as for INT8",
        "inference": pass_savings(tokenizer, args.data),
    }
    write_json(args.out, results)
    log(json.dumps({"compare": compare, "keeps_accuracy": keeps, "inference": results["inference"]}))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
