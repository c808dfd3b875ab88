"""Fine-tuning: set_seed → tokenizer and model → Trainer with early stopping → best model → model directory.

The output is the model directory the sidecar reads (see ARCHITECTURE.md): weights, tokenizer,
``config.json`` with the labels and ``sidecar_task``, ``eval_results.json`` and a ``README.md`` card.
Checkpoints live in ``<output>/checkpoints`` while training and are removed at the end unless kept;
TensorBoard logs go to ``<output>/runs`` unless another directory is given.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from model_contract.eval_results import write_results
from model_contract.tasks import get_task
from trainer.data import TaskData
from trainer.evaluate import category_metrics, evaluate_category, evaluate_pii, pii_metrics, tags_from_ids
from trainer.preprocess import encode_category, encode_pii
from trainer.run_steps import BaseModelError, drop_checkpoints, load_pretrained, make_trainer, save_model
from trainer.settings import TrainingSettings

log = structlog.get_logger(__name__)

CHECKPOINTS = "checkpoints"
BEST_METRIC = "f1"
SPECIAL_TOKEN_IDS = ("cls_token_id", "sep_token_id", "pad_token_id")
"""Token ids the sidecar reads from ``config.json``: it wraps every window in CLS ... SEP and pads with PAD."""


@dataclass(frozen=True)
class RunOptions:
    """Where a run reads its base model and writes its model directory."""

    base_model: str
    output: Path
    max_length: int = 512
    """Tokens per input, special tokens included (capped by the model's position embeddings)."""
    stride: int = 64
    """PII only: tokens shared by consecutive windows of a long text."""
    keep_checkpoints: bool = False
    logging_dir: Path | None = None
    """TensorBoard event files; default ``<output>/runs``."""
    teacher: str | None = None
    """A fine-tuned model of the same task and labels whose predictions are learnt too (token tasks: one that
    reads with the student's tokenizer)."""
    teacher_weight: float = 0.5
    """Share of the loss that is the teacher's (the rest is the labels' cross-entropy)."""
    temperature: float = 2.0
    """Softens both predictions before they are compared."""


@dataclass(frozen=True)
class Hardware:
    device: str
    name: str
    fp16: bool
    gradient_checkpointing: bool


def hardware(settings: TrainingSettings) -> Hardware:
    """fp16 and gradient checkpointing only where CUDA is present; CPU trains in fp32."""
    import torch

    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.get_device_name(0), settings.mixed_precision, settings.gradient_checkpointing)
    return Hardware("cpu", "cpu", False, False)


def load_base(base_model: str, task: str, labels: list[str]):
    """Tokenizer and a fresh classification head on ``base_model`` (a local directory or Hub id)."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    model_cls = AutoModelForSequenceClassification if get_task(task).head == "sequence" else AutoModelForTokenClassification
    tokenizer = load_pretrained(base_model, AutoTokenizer.from_pretrained)
    model = load_pretrained(base_model, lambda name: model_cls.from_pretrained(
        name, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}))
    if not tokenizer.is_fast:
        raise BaseModelError(f"{base_model}: needs a fast tokenizer (tokenizer.json) for offset mappings")
    fill_special_token_ids(model.config, tokenizer, base_model)  # before training: a base it cannot serve fails now
    model.config.sidecar_task = task
    return tokenizer, model


def missing_special_token_ids(config: Mapping[str, Any], tokenizer, source: str) -> dict[str, int]:
    """The ids of :data:`SPECIAL_TOKEN_IDS` that `config` lacks, taken from `tokenizer` (a transformers tokenizer).

    ModernBERT configs carry all three; BERT-family configs only ``pad_token_id``, though their tokenizers
    have ``[CLS]`` and ``[SEP]``. Raises BaseModelError naming `source` when the tokenizer lacks one too.
    """
    found: dict[str, int] = {}
    for key in SPECIAL_TOKEN_IDS:
        if _is_token_id(config.get(key)):
            continue
        value = getattr(tokenizer, key, None)
        if not _is_token_id(value):
            token = key.removesuffix("_token_id").upper()
            raise BaseModelError(
                f"{source}: the tokenizer has no {token} token and the config no '{key}'; the sidecar wraps "
                "every window in CLS ... SEP and pads with PAD, so it needs all three token ids"
            )
        found[key] = value
    return found


def fill_special_token_ids(config, tokenizer, base_model: str) -> dict[str, int]:
    """Set the CLS/SEP/PAD ids a transformers `config` lacks from `tokenizer`; return what was set."""
    current = {key: getattr(config, key, None) for key in SPECIAL_TOKEN_IDS}
    filled = missing_special_token_ids(current, tokenizer, base_model)
    for key, value in filled.items():
        setattr(config, key, value)
    if filled:
        log.info("special_token_ids_from_tokenizer", base_model=base_model, **filled)
    return filled


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def training_arguments(settings: TrainingSettings, output_dir: Path, hw: Hardware):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size * 2,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a fraction of the total steps
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",  # batches of like lengths (shuffled): little time spent on padding
        eval_strategy=settings.eval_strategy,
        eval_steps=settings.eval_steps,
        save_strategy=settings.eval_strategy,
        save_steps=settings.eval_steps,
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model=BEST_METRIC,
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        report_to=["tensorboard"],
        fp16=hw.fp16,
        activation_checkpointing=hw.gradient_checkpointing,
        dataloader_pin_memory=hw.device == "cuda",
        seed=settings.seed,
    )


@dataclass
class _Inputs:
    """What the Trainer is fed for one task: datasets, collator, metrics, and the sizes to report."""

    train: Any
    validation: Any
    collator: Any
    compute_metrics: Callable[[Any], dict[str, float]]
    sizes: dict[str, int]


def train(data: TaskData, settings: TrainingSettings, options: RunOptions) -> dict[str, Any]:
    """Train, keep the best model by weighted F1, write the model directory; return eval_results."""
    from transformers import EarlyStoppingCallback, set_seed

    started = time.perf_counter()
    set_seed(settings.seed)
    hw = hardware(settings)
    tokenizer, model = load_base(options.base_model, data.task, data.labels)
    max_length = min(options.max_length, model.config.max_position_embeddings)
    inputs = task_inputs(data, tokenizer, max_length, options.stride, pad_multiple=8 if hw.fp16 else None)
    trainer_class = with_teacher(inputs, data, tokenizer, options, max_length)
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    logging_dir = Path(options.logging_dir or output / "runs")
    args = training_arguments(settings, output / CHECKPOINTS, hw)
    args.remove_unused_columns = trainer_class is None  # the teacher's logits are not a model input
    trainer = make_trainer(
        logging_dir, trainer_class, model=model, args=args,
        data_collator=inputs.collator, train_dataset=inputs.train, eval_dataset=inputs.validation,
        processing_class=tokenizer, compute_metrics=inputs.compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.patience)])
    log.info("training_start", task=data.task, base_model=options.base_model, labels=len(data.labels),
             device=hw.device, max_length=max_length, logging_dir=str(logging_dir), **inputs.sizes)
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    save_best(trainer.model, tokenizer, output, data.task, max_length, options.base_model)
    report = final_report(trainer.model, tokenizer, data, max_length, options.stride, settings.batch_size * 2)
    results = {**run_record(data, settings, options, hw, max_length, inputs.sizes), **report,
               "training": training_record(trainer.state, result),
               "time": {"train_seconds": round(train_seconds, 2),
                        "total_seconds": round(time.perf_counter() - started, 2)}}
    write_results(output, results)
    from trainer.card import write_card

    write_card(output, results)
    drop_checkpoints(output / CHECKPOINTS, options.keep_checkpoints)
    log.info("training_done", task=data.task, output=str(output), seconds=results["time"]["total_seconds"],
             steps=trainer.state.global_step, **{k: round(v, 4) for k, v in results["metrics"].items()})
    return results


def task_inputs(data: TaskData, tokenizer, max_length: int, stride: int, pad_multiple: int | None) -> _Inputs:
    """Category: one truncated sequence per text; PII: overlapping windows with BIO labels."""
    import datasets
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    label2id = {label: i for i, label in enumerate(data.labels)}
    sizes = {"train_examples": len(data.train), "validation_examples": len(data.validation)}
    if get_task(data.task).head == "sequence":
        def encode(rows):
            return datasets.Dataset.from_dict(encode_category(tokenizer, rows, label2id, max_length))

        return _Inputs(encode(data.train), encode(data.validation),
                       DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple),
                       lambda p: category_metrics(p.label_ids, p.predictions), sizes)
    id2label = dict(enumerate(data.labels))
    windows = [encode_pii(tokenizer, rows, label2id, max_length, stride) for rows in (data.train, data.validation)]
    sizes |= {"train_windows": len(windows[0]), "validation_windows": len(windows[1])}
    return _Inputs(*(datasets.Dataset.from_dict(w.features()) for w in windows),
                   DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_multiple),
                   lambda p: pii_metrics(*tags_from_ids(p.label_ids, p.predictions, id2label)), sizes)


def check_teacher(options: RunOptions) -> None:
    """Distillation settings that cannot work, refused before any data is read."""
    from trainer.settings import UsageError

    if options.teacher is not None and (not 0 <= options.teacher_weight <= 1 or options.temperature <= 0):
        raise UsageError("--teacher-weight must be in [0, 1] and --temperature positive")


def with_teacher(inputs: _Inputs, data: TaskData, tokenizer, options: RunOptions, max_length: int) -> type | None:
    """With a teacher: its logits join the training rows (per text for a sequence task, per token of each window
    for a token task) and the Trainer learns from both (trainer.distill)."""
    if options.teacher is None:
        return None
    from trainer.distill import TeacherPadding, distillation_trainer, teacher_logits, token_teacher_logits

    check_teacher(options)
    if get_task(data.task).head == "sequence":
        logits = teacher_logits(options.teacher, [e.text for e in data.train], data.labels, max_length)
    else:
        logits = token_teacher_logits(options.teacher, tokenizer, list(inputs.train["input_ids"]), data.labels)
        inputs.collator = TeacherPadding(inputs.collator, tokenizer.padding_side)
    inputs.train = inputs.train.add_column("teacher_logits", logits)
    log.info("teacher_logits", teacher=options.teacher, rows=len(logits))
    return distillation_trainer(options.teacher_weight, options.temperature)


def save_best(model, tokenizer, output: Path, task: str, max_length: int, base_model: str) -> None:
    """The best model as the sidecar reads it: its task, the window it learnt on, the special token ids."""
    fill_special_token_ids(model.config, tokenizer, base_model)  # the sidecar reads them from config.json
    model.config.sidecar_task = task
    model.config.sidecar_max_length = max_length  # the window it learnt on is the window it is served at
    _remove_stale_exports(output)
    save_model(model, tokenizer, output)


def final_report(model, tokenizer, data: TaskData, max_length: int, stride: int, batch_size: int) -> dict[str, Any]:
    """The best model's validation metrics (per class or per entity type)."""
    if get_task(data.task).head == "sequence":
        report = evaluate_category(model, tokenizer, data.validation, max_length, batch_size)
    else:
        report = evaluate_pii(model, tokenizer, data.validation, max_length, stride, batch_size)
    report.pop("examples", None)
    report.pop("windows", None)
    return report


def run_record(data: TaskData, settings: TrainingSettings, options: RunOptions, hw: Hardware, max_length: int,
               sizes: dict[str, int]) -> dict[str, Any]:
    """What was trained, on what, how and where: the reproducible half of eval_results.json."""
    import torch
    import transformers

    return {
        "task": data.task,
        "base_model": options.base_model,
        **({"teacher": {"model": options.teacher, "weight": options.teacher_weight,
                        "temperature": options.temperature}} if options.teacher else {}),
        "labels": data.labels,
        "data": {"train": data.train_sources, "validation": data.validation_sources,
                 "validation_from": data.validation_from, "text_column": data.text_column, **sizes},
        "settings": {**dataclasses.asdict(settings), "max_length": max_length,
                     **({"stride": options.stride} if get_task(data.task).head == "token" else {}), "best_model_metric": BEST_METRIC},
        "hardware": dataclasses.asdict(hw),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }


def training_record(state, result) -> dict[str, Any]:
    return {
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(float(state.epoch or 0), 3),
        "train_loss": float(result.training_loss),
        "best_step": _step_of(state.best_model_checkpoint),
        "best_validation_f1": state.best_metric,
        "stopped_early": state.global_step < state.max_steps,
    }


def _remove_stale_exports(output: Path) -> None:
    """ONNX files from an earlier run no longer match the new weights, and the sidecar prefers ONNX."""
    from model_contract.model_dir import ONNX_FILE, ONNX_INT8_FILE

    stale = [output / name for name in (ONNX_FILE, ONNX_FILE + ".data", ONNX_INT8_FILE, ONNX_INT8_FILE + ".data")]
    removed = [p.name for p in stale if p.is_file()]
    for name in removed:
        (output / name).unlink()
    if removed:
        log.info("stale_export_removed", output=str(output), files=removed)


def _step_of(checkpoint: str | None) -> int | None:
    if not checkpoint:
        return None
    tail = Path(checkpoint).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None
