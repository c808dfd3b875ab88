"""`trainer pretrain`: continued masked-language-model pretraining on local text.

A model made by ``trainer base`` starts from random weights; a few epochs of MLM on in-domain text
(masking 30% of tokens, as ModernBERT does) teach it the language before fine-tuning, which is what
makes small models trained offline worth shipping. The output is a masked-LM model directory that
``trainer category``/``trainer pii`` accept as ``--base-model``.

With ``--teacher`` the student learns from a pretrained encoder instead of from masked tokens
(trainer.distill): it reproduces the teacher's hidden states on the same corpus.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from trainer.base import CorpusError, iter_corpus
from trainer.run_steps import BaseModelError, drop_checkpoints, load_pretrained, make_trainer, save_model
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
    keep_checkpoints: bool = False, teacher: str | None = None,
) -> dict[str, Any]:
    """Continue MLM training of ``base_model`` on ``corpus`` (or distil ``teacher`` into it); write the model,
    tokenizer and results."""
    import torch
    from transformers import set_seed

    settings.check()
    started = time.perf_counter()
    set_seed(settings.seed)
    texts = list(iter_corpus(corpus))
    if not texts:
        raise CorpusError(f"{', '.join(map(str, corpus))}: no text found")
    tokenizer, model = load_mlm(base_model)
    random.Random(settings.seed).shuffle(texts)
    n_val = int(len(texts) * settings.validation_fraction)
    held_out, kept = texts[:n_val], texts[n_val:]
    max_length = min(settings.max_length, model.config.max_position_embeddings)
    train_ds = sequences(tokenizer, kept, max_length)
    val_ds = sequences(tokenizer, held_out, max_length) if held_out else None
    cuda = torch.cuda.is_available()
    output = Path(output)
    model, collator = objective(model, tokenizer, settings, teacher, pad_multiple=8 if cuda else None)
    trainer = make_trainer(output / "runs", model=model, args=mlm_arguments(settings, output / "checkpoints", cuda,
                                                                            val_ds is not None),
                           data_collator=collator, train_dataset=train_ds, eval_dataset=val_ds,
                           processing_class=tokenizer)
    log.info("pretrain_start", base_model=base_model, texts=len(kept), sequences=len(train_ds),
             held_out=len(held_out), device="cuda" if cuda else "cpu", teacher=teacher)
    result = trainer.train()
    metrics: dict[str, float] = {"train_loss": float(result.training_loss)}
    if val_ds is not None:
        loss = float(trainer.evaluate()["eval_loss"])
        metrics["validation_loss"] = loss
        metrics["validation_loss_at_start"] = next(float(e["eval_loss"]) for e in trainer.state.log_history
                                                   if "eval_loss" in e)
        if teacher is None:
            metrics["validation_perplexity"] = math.exp(min(loss, 50.0))
    save_model(getattr(trainer.model, "student", trainer.model), tokenizer, output)
    results = {"base_model": base_model, "teacher": teacher, "corpus": [str(c) for c in corpus], "texts": len(kept),
               "held_out_texts": len(held_out), "sequences": len(train_ds), "settings": asdict(settings),
               "steps": trainer.state.global_step, "metrics": metrics, "device": "cuda" if cuda else "cpu",
               "time_seconds": round(time.perf_counter() - started, 2)}
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    drop_checkpoints(output / "checkpoints", keep_checkpoints)
    log.info("pretrain_done", output=str(output), steps=results["steps"], seconds=results["time_seconds"],
             **{k: round(v, 4) for k, v in metrics.items()})
    return results


def objective(model, tokenizer, settings: PretrainSettings, teacher: str | None, pad_multiple: int | None):
    """What the Trainer optimizes, and its collator: masked tokens, or the teacher's hidden states."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    if teacher is None:
        return model, DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=settings.mlm_probability, pad_to_multiple_of=pad_multiple)
    from trainer.distill import distiller, load_teacher

    return distiller(model, load_teacher(teacher, tokenizer)), DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=pad_multiple)


def load_mlm(base_model: str):
    """Tokenizer and masked-LM model; a tokenizer without a mask token cannot be pretrained this way."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = load_pretrained(base_model, AutoTokenizer.from_pretrained)
    model = load_pretrained(base_model, AutoModelForMaskedLM.from_pretrained)
    if tokenizer.mask_token is None:
        raise BaseModelError(f"{base_model}: the tokenizer has no mask token; cannot do masked-LM training")
    return tokenizer, model


def sequences(tokenizer, texts: list[str], max_length: int):
    """Texts cut into sequences of at most `max_length` tokens (a long text gives several)."""
    import datasets

    enc = tokenizer(texts, truncation=True, max_length=max_length, return_overflowing_tokens=True)
    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def mlm_arguments(settings: PretrainSettings, checkpoints: Path, cuda: bool, evaluate: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,
        eval_strategy="epoch" if evaluate else "no",
        eval_on_start=evaluate,  # the held-out loss before training, to compare with the loss after
        train_sampling_strategy="group_by_length",  # batches of like lengths: little time spent on padding
        save_strategy="no",
        logging_steps=settings.logging_steps,
        report_to=["tensorboard"],
        fp16=cuda,
        dataloader_pin_memory=cuda,
        seed=settings.seed,
    )
