"""Training settings chosen by training-set size, and the flags that override them.

The rules are the design card's: small sets get fewer epochs, smaller batches, a gentler learning rate,
more regularisation and more patient evaluation (per epoch); larger sets evaluate on a step schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

EvalStrategy = Literal["epoch", "steps"]


class UsageError(ValueError):
    """A flag value that cannot work; the message names the flag."""


@dataclass(frozen=True)
class TrainingSettings:
    epochs: float
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    """Fraction of the training steps spent warming the learning rate up from 0."""
    eval_strategy: EvalStrategy
    eval_steps: int | None
    """Steps between evaluations (and checkpoints) when ``eval_strategy`` is ``steps``."""
    patience: int
    """Evaluations without a better weighted F1 before training stops early."""
    max_steps: int = -1
    """A positive value caps the number of optimiser steps (overrides epochs)."""
    seed: int = 42
    logging_steps: int = 10
    gradient_accumulation_steps: int = 1
    mixed_precision: bool = True
    """fp16 where CUDA is present; CPU always trains in fp32."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass where CUDA is present (saves GPU memory)."""


def settings_for(n_train: int) -> TrainingSettings:
    """The dataset-size rules: <1000, <5000, and everything larger."""
    if n_train < 1000:
        return TrainingSettings(
            epochs=2, batch_size=4, learning_rate=1e-5, weight_decay=0.15, warmup_ratio=0.1,
            eval_strategy="epoch", eval_steps=None, patience=1,
        )
    if n_train < 5000:
        return TrainingSettings(
            epochs=3, batch_size=8, learning_rate=2e-5, weight_decay=0.1, warmup_ratio=0.06,
            eval_strategy="steps", eval_steps=100, patience=2,
        )
    return TrainingSettings(
        epochs=4, batch_size=16, learning_rate=3e-5, weight_decay=0.05, warmup_ratio=0.03,
        eval_strategy="steps", eval_steps=200, patience=3,
    )


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainingOverrides:
    """Training settings: override single values of the dataset-size rules (unset flags keep the rule's value)."""

    epochs: float | None = field(default=None, metadata=_help("training epochs"))
    batch_size: int | None = field(default=None, metadata=_help("examples per device and step"))
    learning_rate: float | None = field(default=None, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float | None = field(default=None, metadata=_help("AdamW weight decay"))
    warmup_ratio: float | None = field(default=None, metadata=_help("fraction of steps for linear warmup, in [0, 1)"))
    eval_strategy: EvalStrategy | None = field(default=None, metadata=_help("evaluate (and checkpoint) per epoch or every --eval-steps"))
    eval_steps: int | None = field(default=None, metadata=_help("steps between evaluations; implies --eval-strategy steps"))
    patience: int | None = field(default=None, metadata=_help("evaluations without improvement before stopping early"))
    max_steps: int | None = field(default=None, metadata=_help("stop after this many optimiser steps (for smoke runs)"))
    seed: int | None = field(default=None, metadata=_help("seed for weights init, shuffling and the validation split"))
    logging_steps: int | None = field(default=None, metadata=_help("steps between loss logs (TensorBoard)"))
    gradient_accumulation_steps: int | None = field(default=None, metadata=_help("batches per optimiser step"))
    mixed_precision: bool | None = field(default=None, metadata=_help("fp16 on CUDA (default on; never on CPU)"))
    gradient_checkpointing: bool | None = field(default=None, metadata=_help("gradient checkpointing on CUDA (default on; never on CPU)"))


def apply_overrides(settings: TrainingSettings, overrides: TrainingOverrides) -> TrainingSettings:
    """The settings with every flag that was given; ``UsageError`` names a flag that cannot work."""
    changes = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
    if "eval_steps" in changes and "eval_strategy" not in changes:
        changes["eval_strategy"] = "steps"
    if changes.get("eval_strategy") == "epoch":
        changes["eval_steps"] = None
    result = dataclasses.replace(settings, **changes)
    _check(result)
    return result


def _check(s: TrainingSettings) -> None:
    def positive(flag: str, value: float) -> None:
        if value <= 0:
            raise UsageError(f"--{flag} must be positive, got {value}")

    positive("epochs", s.epochs)
    positive("batch-size", s.batch_size)
    positive("learning-rate", s.learning_rate)
    positive("patience", s.patience)
    positive("logging-steps", s.logging_steps)
    positive("gradient-accumulation-steps", s.gradient_accumulation_steps)
    if s.weight_decay < 0:
        raise UsageError(f"--weight-decay must not be negative, got {s.weight_decay}")
    if not 0 <= s.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {s.warmup_ratio}")
    if s.max_steps == 0 or s.max_steps < -1:
        raise UsageError(f"--max-steps must be positive, got {s.max_steps}")
    if s.eval_strategy == "steps" and (s.eval_steps is None or s.eval_steps <= 0):
        raise UsageError("--eval-strategy steps needs a positive --eval-steps")
