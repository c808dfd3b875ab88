"""`trainer`: build, pretrain, fine-tune, evaluate and export the sidecar's ModernBERT classifiers.

    trainer base --size tiny --corpus texts.txt --output base/
    trainer pretrain --base-model base/ --corpus texts.txt --output pretrained/
    trainer category --train train.jsonl --base-model pretrained/ --output category/ --int8
    trainer pii --train synth.jsonl presidio.json --base-model pretrained/ --output pii/ --int8
    trainer synth-pii --count 5000 --output synth.jsonl
    trainer evaluate category/ --data test.jsonl --output report.json [--runtime onnx-int8]
    trainer export category/ --int8
    trainer ensemble pii-a/ pii-b/ --output pii/

``evaluate`` scores a model directory as the sidecar serves it (trainer.served): INT8 ONNX on CPU by
default, its windows, the pattern recognizers and the default PII policy.

Each subcommand's flags come from argument dataclasses (field help is the flag help). Bad input ends
with one line, ``error: <file>:<row>: <problem>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model_contract.tasks import get_task, task_names
from trainer.pretrain import PretrainSettings
from trainer.settings import TrainingOverrides, UsageError

EXIT_BAD_INPUT = 2
DEFAULT_BASE_MODEL = "answerdotai/ModernBERT-base"


def _arg(help: str, **extra: Any) -> dict:
    return {"help": help, **extra}


# --- argument dataclasses --------------------------------------------------------------------------

_QUANTIZATION_HELP = ("static: activation ranges fixed at export from calibration texts, so a text's result does "
                      "not depend on its batch; dynamic: ranges per batch, no calibration")
_CALIBRATION_HELP = ("files whose texts (in the column the model was trained on, or Presidio 'full_text') set the "
                     "static INT8 ranges (default: the training files eval_results.json records)")


@dataclass
class BaseArguments:
    """The model to build."""

    size: Literal["tiny", "small", "medium"] = field(metadata=_arg(
        "model size: tiny trains in seconds (tests); small is shippable; medium is deeper (about 1.7x the compute)"))
    output: str = field(metadata=_arg("directory for the untrained model and its tokenizer"))
    corpus: list[str] | None = field(default=None, metadata=_arg(
        "text files (a line each) or JSON/JSONL with text/full_text fields, to train the tokenizer on"))
    embeddings_from: str | None = field(default=None, metadata=_arg(
        "a pretrained encoder (directory or Hub id) whose tokenizer and word embeddings (PCA to the model's width) "
        "the model takes instead of a tokenizer trained on --corpus; then `trainer pretrain --teacher` it"))
    seed: int = field(default=42, metadata=_arg("seed for the initial weights"))


@dataclass
class PretrainArguments:
    """Model and corpus."""

    base_model: str = field(metadata=_arg("masked-LM model directory (e.g. from `trainer base`) or Hub id"))
    corpus: list[str] = field(metadata=_arg("text files (a line each) or JSON/JSONL with text/full_text fields"))
    output: str = field(metadata=_arg("directory for the pretrained model"))
    teacher: str | None = field(default=None, metadata=_arg(
        "distil this pretrained encoder (directory or Hub id) instead of masked-LM training: the student learns "
        "its hidden states; the student must use its tokenizer (`trainer base --embeddings-from`)"))
    keep_checkpoints: bool = field(default=False, metadata=_arg("keep <output>/checkpoints after training"))


@dataclass
class ModelArguments:
    """Model: base, output directory and export."""

    output: str = field(metadata=_arg("model directory to write (weights, tokenizer, config, eval_results.json, card)"))
    base_model: str = field(default=DEFAULT_BASE_MODEL, metadata=_arg("ModernBERT to fine-tune: local directory or Hub id"))
    keep_checkpoints: bool = field(default=False, metadata=_arg("keep <output>/checkpoints after training"))
    logging_dir: str | None = field(default=None, metadata=_arg("TensorBoard log directory (default <output>/runs)"))
    teacher: str | None = field(default=None, metadata=_arg(
        "a fine-tuned model of the same task and labels (directory or Hub id) whose predictions the model learns "
        "beside the labels (distillation); any tokenizer for category, the student's own for pii"))
    teacher_weight: float = field(default=0.5, metadata=_arg("share of the loss that is the teacher's, in [0, 1]"))
    temperature: float = field(default=2.0, metadata=_arg("softens the teacher's and the model's predictions before they are compared"))
    export: bool = field(default=False, metadata=_arg("export model.onnx right after training"))
    int8: bool = field(default=False, metadata=_arg("also export model.int8.onnx (implies --export)"))
    export_tolerance: float | None = field(default=None, metadata=_arg("largest allowed ONNX-vs-PyTorch logit difference"))
    int8_quantization: Literal["static", "dynamic"] = field(default="static", metadata=_arg(_QUANTIZATION_HELP))
    int8_calibration: list[str] | None = field(default=None, metadata=_arg(_CALIBRATION_HELP))


@dataclass
class DataArguments:
    """Data: sources, columns, validation split and lengths."""

    train: list[str] = field(metadata=_arg("training data: JSONL/JSON/CSV/Parquet files, a datasets directory or a Hub dataset id"))
    validation: list[str] | None = field(default=None, metadata=_arg("validation data; without it a split of --train is held out"))
    dataset_split: str = field(default="train", metadata=_arg("split of --train to use for datasets directories and Hub ids"))
    validation_split: str = field(default="validation", metadata=_arg("split of --validation for datasets directories and Hub ids"))
    validation_fraction: float = field(default=0.1, metadata=_arg("share of --train held out when no --validation is given"))
    max_train_samples: int | None = field(default=None, metadata=_arg("train on a seeded random sample of this many rows"))
    max_validation_samples: int | None = field(default=None, metadata=_arg("validate on a seeded random sample of this many rows"))
    max_length: int = field(default=512, metadata=_arg("tokens per input, special tokens included"))


@dataclass
class CategoryDataArguments(DataArguments):
    """Data: sources, columns, validation split and lengths."""

    text_column: str = field(default="text", metadata=_arg("column with the text (MMLU-Pro: question)"))
    label_column: str = field(default="label", metadata=_arg("column with the label (MMLU-Pro: category)"))


@dataclass
class PiiDataArguments(DataArguments):
    """Data: sources, validation split, lengths and windows."""

    stride: int = field(default=64, metadata=_arg("tokens shared by consecutive windows of a text longer than --max-length"))


@dataclass
class SynthArguments:
    """Synthetic data."""

    output: str = field(metadata=_arg("JSONL file to write (span format)"))
    count: int = field(default=1000, metadata=_arg("number of rows"))
    seed: int = field(default=42, metadata=_arg("the same seed gives the same rows"))


@dataclass
class EvaluateArguments:
    """Model, data and report."""

    model_dir: str = field(metadata=_arg("model directory made by `trainer category` or `trainer pii` (ONNX files alone will do)", positional=True))
    data: list[str] = field(metadata=_arg("labelled data in any format `trainer category`/`trainer pii` accept"))
    runtime: Literal["auto", "onnx", "onnx-int8", "torch"] = field(default="auto", metadata=_arg(
        "what the sidecar serves: auto takes model.int8.onnx on CPU, model.onnx on GPU, PyTorch weights when no ONNX file exists"))
    output: str | None = field(default=None, metadata=_arg("write the report as JSON here"))
    confusion_matrix: str | None = field(default=None, metadata=_arg(
        "category models: confusion-matrix PNG path (default confusion_matrix.png next to --output, else in the current directory)"))
    text_column: str = field(default="text", metadata=_arg("column with the text (category data)"))
    label_column: str = field(default="label", metadata=_arg("column with the label (category data)"))
    dataset_split: str = field(default="train", metadata=_arg("split for datasets directories and Hub ids"))
    max_length: int | None = field(default=None, metadata=_arg(
        "tokens per window, as models.*.max_length in the sidecar config (default: the window the model was trained at, else 512)"))
    stride: int | None = field(default=None, metadata=_arg("pii: tokens shared by consecutive windows, as models.pii.stride (default: 64)"))
    drop_unknown_labels: bool = field(default=False, metadata=_arg(
        "category: skip rows whose label the model does not have, instead of failing (pii: every gold type is scored; "
        "the recognizers find types the model lacks)"))
    entity_bias: list[str] | None = field(default=None, metadata=_arg(
        "pii: TYPE=VALUE added to that type's scores before each token's tag is chosen, as models.pii.entity_bias "
        "(e.g. PERSON=1.5: more names caught, more false masks)"))


@dataclass
class ExportArguments:
    """Model and export options."""

    model_dir: str = field(metadata=_arg("model directory to export into", positional=True))
    int8: bool = field(default=False, metadata=_arg("also write model.int8.onnx"))
    tolerance: float | None = field(default=None, metadata=_arg("largest allowed ONNX-vs-PyTorch logit difference"))
    int8_quantization: Literal["static", "dynamic"] = field(default="static", metadata=_arg(_QUANTIZATION_HELP))
    int8_calibration: list[str] | None = field(default=None, metadata=_arg(_CALIBRATION_HELP))


@dataclass
class EnsembleArguments:
    """The members and where the ensemble goes."""

    members: list[str] = field(metadata=_arg(
        "model directories of one task that read text the same way (tokenizer, labels, window), each exported "
        "to ONNX", positional=True))
    output: str = field(metadata=_arg("directory for the ensemble (replaced if it exists)"))
    weights: list[float] | None = field(default=None, metadata=_arg(
        "each member's share of the logits, in the members' order (default: equal)"))
    entity_bias: list[str] | None = field(default=None, metadata=_arg(
        "pii: TYPE=VALUE added to that type's logits after the mean, inside the graph (models.pii.entity_bias "
        "still adds on top when serving)"))


# --- dataclass → argparse --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field: ``--snake-name``, typed, with the field's help; positional when asked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"help": f.metadata.get("help")}
        if _is_optional(kind):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
            kwargs["type"] = type(kwargs["choices"][0])
        elif typing.get_origin(kind) is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(kind)[0]
            kwargs["metavar"] = "FILE" if f.name in ("corpus", "train", "validation", "data") else \
                "TYPE=VALUE" if f.name == "entity_bias" else None
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
        has_default = f.default is not dataclasses.MISSING
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        if has_default:
            kwargs["default"] = f.default
            if f.default not in (None, False) and kwargs["help"]:
                kwargs["help"] += " (default: %(default)s)"
        else:
            kwargs["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def _is_optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def build(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


# --- subcommands -----------------------------------------------------------------------------------


def run_base(ns: argparse.Namespace) -> int:
    from trainer.base import build_base

    args = build(BaseArguments, ns)
    if not args.corpus and not args.embeddings_from:
        raise UsageError("give --corpus (to train a tokenizer) or --embeddings-from (a pretrained encoder's)")
    out = build_base(args.size, args.corpus, args.output, seed=args.seed, embeddings_from=args.embeddings_from)
    print(f"wrote untrained {args.size} ModernBERT to {out}")
    return 0


def run_pretrain(ns: argparse.Namespace) -> int:
    from trainer.pretrain import pretrain

    args, settings = build(PretrainArguments, ns), build(PretrainSettings, ns)
    results = pretrain(args.base_model, args.corpus, args.output, settings, keep_checkpoints=args.keep_checkpoints,
                       teacher=args.teacher)
    print(f"wrote {args.output}: {json.dumps(results['metrics'])}")
    return 0


def run_training(task: str, ns: argparse.Namespace) -> int:
    from trainer.data import load_task_data
    from trainer.settings import apply_overrides, settings_for
    from trainer.train import RunOptions, check_teacher, train

    model_args = build(ModelArguments, ns)
    if model_args.int8_calibration and not (model_args.int8 and model_args.int8_quantization == "static"):
        from trainer.settings import UsageError

        raise UsageError("--int8-calibration sets static INT8 ranges: it needs --int8 (and static quantization)")
    data_args = build(_data_arguments(task), ns)
    overrides = build(TrainingOverrides, ns)
    options = RunOptions(
        base_model=model_args.base_model,
        output=Path(model_args.output),
        max_length=data_args.max_length,
        stride=getattr(data_args, "stride", 64),
        keep_checkpoints=model_args.keep_checkpoints,
        logging_dir=Path(model_args.logging_dir) if model_args.logging_dir else None,
        teacher=model_args.teacher,
        teacher_weight=model_args.teacher_weight,
        temperature=model_args.temperature,
    )
    check_teacher(options)
    seed = overrides.seed if overrides.seed is not None else 42
    data = load_task_data(
        task,
        data_args.train,
        data_args.validation,
        text_column=getattr(data_args, "text_column", "text"),
        label_column=getattr(data_args, "label_column", "label"),
        split=data_args.dataset_split,
        validation_split=data_args.validation_split,
        validation_fraction=data_args.validation_fraction,
        max_train_samples=data_args.max_train_samples,
        max_validation_samples=data_args.max_validation_samples,
        seed=seed,
    )
    settings = apply_overrides(settings_for(len(data.train)), overrides)
    results = train(data, settings, options)
    _print_metrics(results)
    if model_args.export or model_args.int8:
        _export(model_args.output, model_args.int8, model_args.export_tolerance, model_args.int8_quantization,
                model_args.int8_calibration)
    return 0


def run_synth(ns: argparse.Namespace) -> int:
    from trainer import synth

    args = build(SynthArguments, ns)
    if args.count < 1:
        from trainer.settings import UsageError

        raise UsageError(f"--count must be at least 1, got {args.count}")
    path = synth.write_jsonl(synth.generate(args.count, args.seed), args.output)
    print(f"wrote {args.count} rows to {path}")
    return 0


def parse_entity_bias(items: list[str]) -> dict[str, float]:
    """``["PERSON=1.5", ...]`` -> ``{"PERSON": 1.5}``; a malformed item is a usage error."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--entity-bias {item!r}: expected TYPE=NUMBER, e.g. PERSON=1.5") from None
    return out


def run_evaluate(ns: argparse.Namespace) -> int:
    """Score the directory as the sidecar serves it (trainer.served) and print and write the report."""
    from sidecar.errors import ModelLoadError
    from trainer.evaluate import plot_confusion_matrix
    from trainer.served import evaluate_served, format_report

    args = build(EvaluateArguments, ns)
    try:
        report = evaluate_served(
            args.model_dir, args.data, args.runtime, args.text_column, args.label_column, args.dataset_split,
            max_length=args.max_length, stride=args.stride, drop_unknown_labels=args.drop_unknown_labels,
            entity_bias=parse_entity_bias(args.entity_bias or []),
        )
    except ModelLoadError as e:  # e.g. --runtime onnx-int8 on a directory without model.int8.onnx
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if "confusion_matrix" in report:
        figure = args.confusion_matrix or (
            Path(args.output).with_name("confusion_matrix.png") if args.output else Path("confusion_matrix.png")
        )
        cm = report["confusion_matrix"]
        report["confusion_matrix_png"] = str(plot_confusion_matrix(cm["matrix"], cm["labels"], figure))
    print(format_report(report))
    if "confusion_matrix_png" in report:
        print(f"confusion matrix: {report['confusion_matrix_png']}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report: {out}")
    return 0


def run_export(ns: argparse.Namespace) -> int:
    args = build(ExportArguments, ns)
    _export(args.model_dir, args.int8, args.tolerance, args.int8_quantization, args.int8_calibration)
    return 0


def run_ensemble(ns: argparse.Namespace) -> int:
    from trainer.ensemble import build_ensemble

    args = build(EnsembleArguments, ns)
    report = build_ensemble(args.members, args.output, args.weights, parse_entity_bias(args.entity_bias or []))
    parity = report["ensemble"]["parity"]
    print(f"wrote {', '.join(parity)} to {args.output}: {len(args.members)} members, largest difference from their "
          f"mean {max(p['max_abs_diff'] for p in parity.values()):.1e}")
    return 0


def _export(model_dir: str, int8: bool, tolerance: float | None, quantization: str = "static",
            calibration: list[str] | None = None) -> None:
    from model_contract.eval_results import read_results
    from trainer.card import write_card
    from trainer.export import export_model_dir

    report = export_model_dir(model_dir, int8=int8, tolerance=tolerance, quantization=quantization,
                              calibration=calibration)
    results = read_results(Path(model_dir))
    if "metrics" in results:  # a directory this trainer made: its card gains the parity numbers
        write_card(model_dir, results)
    files = [report[k] for k in ("onnx_file", "int8_file") if k in report]
    print(f"exported {', '.join(files)} to {model_dir}: "
          + "  ".join(f"{k}={report[k]}" for k in ("onnx_max_abs_diff", "int8_argmax_agreement") if k in report))


def _print_metrics(results: dict[str, Any]) -> None:
    metrics = results.get("metrics", {})
    print("  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


# --- main ------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[str, list[type], Callable[[argparse.Namespace], int]]] = {
    "base": ("an untrained ModernBERT with a byte-level BPE tokenizer trained on your text", [BaseArguments], run_base),
    "pretrain": ("continued masked-LM pretraining on your text (masking probability 0.3)",
                 [PretrainArguments, PretrainSettings], run_pretrain),
    "synth-pii": ("write synthetic PII text with exact spans (JSONL)", [SynthArguments], run_synth),
    "evaluate": ("metrics of a model directory as the sidecar serves it (runtime, windows, recognizers, PII policy) "
                 "on a labelled file", [EvaluateArguments], run_evaluate),
    "export": ("write model.onnx (+ model.int8.onnx) and check parity with PyTorch", [ExportArguments], run_export),
    "ensemble": ("serve several exported model directories of one task as one: their ONNX graphs joined, "
                 "logits averaged", [EnsembleArguments], run_ensemble),
}


def _data_arguments(task: str) -> type:
    """A sequence task reads text + label; a token task text + character spans (or Presidio's format)."""
    return CategoryDataArguments if get_task(task).head == "sequence" else PiiDataArguments


def task_commands() -> dict[str, tuple[str, list[type], Callable[[argparse.Namespace], int]]]:
    """One fine-tuning command per registered task (`model_contract.tasks`), built when the parser is."""
    heads = {"sequence": "fine-tune a sequence classifier (text + label)",
             "token": "fine-tune a BIO token classifier (text + character spans, or Presidio's format)"}
    return {name: (f"{heads[get_task(name).head]}: {get_task(name).description}",
                   [ModelArguments, _data_arguments(name), TrainingOverrides],
                   lambda ns, task=name: run_training(task, ns)) for name in task_names()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer", description="Build, pretrain, fine-tune, evaluate and export the sidecar's ModernBERT classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first, rest = list(COMMANDS.items())[:2], list(COMMANDS.items())[2:]  # base, pretrain, the tasks, the rest
    commands = dict(first) | task_commands() | dict(rest)
    for name, (help_text, classes, handler) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for cls in classes:
            add_arguments(p.add_argument_group((cls.__doc__ or cls.__name__).splitlines()[0].rstrip(".")), cls)
        p.set_defaults(handler=handler)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or flags: one line for the user, not a traceback."""
    from model_contract.model_dir import ModelDirError
    from trainer.base import CorpusError
    from trainer.data import DataError
    from trainer.run_steps import BaseModelError
    from trainer.settings import UsageError

    errors: list[type[BaseException]] = [DataError, CorpusError, UsageError, BaseModelError, ModelDirError]
    from trainer.ensemble import EnsembleError

    errors.append(EnsembleError)
    try:
        from trainer.export import ExportError

        errors.append(ExportError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    errors = _input_errors()
    try:
        return ns.handler(ns)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
