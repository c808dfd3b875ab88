"""`trainer pretrain`: continued masked-language-model pretraining on local text.

A model made by ``trainer base`` starts from random weights; a few epochs of MLM on in-domain text
(masking 30% of tokens, as ModernBERT does) teach it the language before fine-tuning, which is what
makes small models trained offline worth shipping. The output is a masked-LM model directory that
``trainer category``/``trainer pii`` accept as ``--base-model``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from trainer.base import CorpusError, iter_corpus
from trainer.settings import UsageError

log = structlog.get_logger(__name__)

RESULTS_FILE = "pretrain_results.json"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class PretrainSettings:
    """Pretraining settings."""

    epochs: float = field(default=3.0, metadata=_help("passes over the corpus"))
    batch_size: int = field(default=16, metadata=_help("sequences per device and step"))
    learning_rate: float = field(default=5e-4, metadata=_help("peak learning rate (AdamW); high because small models start from scratch"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_ratio: float = field(default=0.06, metadata=_help("fraction of steps for linear warmup, in [0, 1)"))
    max_length: int = field(default=128, metadata=_help("tokens per sequence; longer texts are cut into several sequences"))
    mlm_probability: float = field(default=0.3, metadata=_help("share of tokens masked (ModernBERT uses 0.3)"))
    max_steps: int = field(default=-1, metadata=_help("stop after this many optimiser steps (for smoke runs)"))
    validation_fraction: float = field(default=0.05, metadata=_help("share of texts held out to report MLM loss and perplexity"))
    seed: int = field(default=42, metadata=_help("seed for masking, shuffling and the held-out split"))
    logging_steps: int = field(default=50, metadata=_help("steps between loss logs (TensorBoard)"))

    def check(self) -> None:
        if not 0 < self.mlm_probability < 1:
            raise UsageError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        if not 0 <= self.validation_fraction < 1:
            raise UsageError(f"--validation-fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        for flag, value in (("epochs", self.epochs), ("batch-size", self.batch_size),
                            ("learning-rate", self.learning_rate), ("max-length", self.max_length)):
            if value <= 0:
                raise UsageError(f"--{flag} must be positive, got {value}")


def pretrain(
    base_model: str, corpus: list[str], output: str | Path, settings: PretrainSettings,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Continue MLM training of ``base_model`` on ``corpus``; write the model, tokenizer and results."""
    import datasets
    import torch
    from transformers import (
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from trainer.train import BaseModelError, tensorboard_logs

    settings.check()
    started = time.perf_counter()
    set_seed(settings.seed)
    texts = list(iter_corpus(corpus))
    if not texts:
        raise CorpusError(f"{', '.join(map(str, corpus))}: no text found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForMaskedLM.from_pretrained(base_model)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BaseModelError(f"{base_model}: cannot load the base model ({first})") from e
    if tokenizer.mask_token is None:
        raise BaseModelError(f"{base_model}: the tokenizer has no mask token; cannot do masked-LM training")

    random.Random(settings.seed).shuffle(texts)
    n_val = int(len(texts) * settings.validation_fraction)
    held_out, kept = texts[:n_val], texts[n_val:]
    max_length = min(settings.max_length, model.config.max_position_embeddings)

    def encode(chunk: list[str]):
        enc = tokenizer(chunk, truncation=True, max_length=max_length, return_overflowing_tokens=True)
        return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})

    train_ds = encode(kept)
    val_ds = encode(held_out) if held_out else None
    cuda = torch.cuda.is_available()
    output = Path(output)
    checkpoints = output / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,
        eval_strategy="epoch" if val_ds is not None else "no",
        save_strategy="no",
        logging_steps=settings.logging_steps,
        report_to=["tensorboard"],
        fp16=cuda,
        dataloader_pin_memory=cuda,
        seed=settings.seed,
    )
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=settings.mlm_probability, pad_to_multiple_of=8 if cuda else None
    )
    with tensorboard_logs(output / "runs"):  # the callback reads it when the Trainer is built
        trainer = Trainer(
            model=model, args=args, data_collator=collator, train_dataset=train_ds, eval_dataset=val_ds,
            processing_class=tokenizer,
        )
    log.info("pretrain_start", base_model=base_model, texts=len(kept), sequences=len(train_ds),
             held_out=len(held_out), device="cuda" if cuda else "cpu")
    result = trainer.train()
    metrics: dict[str, float] = {"train_loss": float(result.training_loss)}
    if val_ds is not None:
        loss = float(trainer.evaluate()["eval_loss"])
        metrics |= {"validation_loss": loss, "validation_perplexity": math.exp(min(loss, 50.0))}

    output.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    results = {
        "base_model": base_model,
        "corpus": [str(c) for c in corpus],
        "texts": len(kept),
        "held_out_texts": len(held_out),
        "sequences": len(train_ds),
        "settings": asdict(settings),
        "steps": trainer.state.global_step,
        "metrics": metrics,
        "device": "cuda" if cuda else "cpu",
        "time_seconds": round(time.perf_counter() - started, 2),
    }
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    log.info("pretrain_done", output=str(output), steps=results["steps"], seconds=results["time_seconds"],
             **{k: round(v, 4) for k, v in metrics.items()})
    return results
