"""`trainer export DIR [--int8]`: ``model.onnx`` (and ``model.int8.onnx``) checked against PyTorch.

The graph comes from the ``torch.export``-based exporter (``dynamo=True``) with eager attention. The
TorchScript exporter is deprecated; SDPA attention exports correctly too but gives a bigger graph that
ran no faster in ONNX Runtime. Opset 20 has a native ``Gelu`` (ONNX Runtime >= 1.18 on CPU and CUDA),
where opset 18 leaves an Erf chain that ORT's fusion does not recognise in this exporter's output.
Inputs are ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``), the output is ``logits``.
Node metadata (stack traces with build-machine paths) is dropped, and the weights stay inside the file
unless they are too big for one protobuf.

Any Hugging Face encoder exports this way, BERT family included: a BERT graph takes no
``token_type_ids`` input (the model's own all-zero buffer stands in, as in training, where the trainer
feeds none). A directory trained before the trainer wrote ``cls_token_id``/``sep_token_id`` into
``config.json`` (BERT configs carry only ``pad_token_id``) gets them from its tokenizer first.

A file is only put in place after ONNX Runtime reproduces the PyTorch logits on a fixed set of texts
(short, long up to the window, non-ASCII; one padded batch and every row alone). fp32 must match
within ``tolerance``; INT8 changes logits by design, so it is judged by how often its argmax agrees with
PyTorch's. The numbers go to ``eval_results.json`` under ``"export"``.

INT8 is static by default: the activation ranges are measured once, at export, on calibration texts (a
sample of the training files the directory records, or of ``calibration``), so a text's logits do not
depend on the other texts in its batch. Dynamic INT8 takes one activation scale per tensor across the whole batch: through the
bundled PII model, 30 of 400 long prompts got other spans alone than in a batch, so a request's masking
moved with concurrent traffic. ``int8_batch_max_diff`` in the report is the largest logit difference of a
row alone against the same row in the padded batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from model_contract.eval_results import EvalResultsError, read_results, update_results
from model_contract.model_dir import (
    CONFIG_FILE,
    ONNX_FILE,
    ONNX_INT8_FILE,
    TOKENIZER_FILE,
    ModelDir,
    resolve,
)
from model_contract.tasks import get_task
from trainer.data import DataError, read_records
from trainer.run_steps import BaseModelError
from trainer.train import SPECIAL_TOKEN_IDS, missing_special_token_ids

log = structlog.get_logger(__name__)

OPSET = 20
ATTN_IMPLEMENTATION = "eager"
FP32_TOLERANCE = 1e-3
# INT8 rounding moves logits (0.2-0.5 at most on the tiny test models), so only decisions near
# a tie flip: briefly trained tiny/small models kept 1.0 (category) and 0.998 (PII tokens) agreement,
# untrained ones with near-tied logits 0.94. Below 0.9 the quantized model decides differently on more
# than one input in ten: a broken quantization (saturation, a mis-scaled layer), not rounding noise.
INT8_MIN_AGREEMENT = 0.9
# Longest parity sequence: past the sidecar's default 512-token window and ModernBERT's sliding
# window, yet cheap enough to run in eager PyTorch on a CPU.
PARITY_MAX_TOKENS = 1024
# Static INT8: texts whose activations set the ranges, and how many go through one calibration pass. Each
# range is the mean of the passes' minima and maxima (ORT's CalibMovingAverage), so one outlier text does not
# coarsen it for all; values past it saturate, which the parity check then measures.
CALIBRATION_TEXTS = 512
CALIBRATION_BATCH = 8
CALIBRATION_SEED = 0
QUANTIZED_OPS = ("MatMul", "Gemm", "Gather")
# protobuf cannot hold a model over 2 GiB; above this the weights go to `model.onnx.data`.
EXTERNAL_DATA_BYTES = 1_800_000_000

PARITY_TEXTS = (
    "Hi",
    "What is the derivative of x^3 at x = 2?",
    "My name is John Smith, my email is john.smith@example.com and my phone is +1 415 555 0100.",
    "Der Vertrag wurde am 3. März 2021 in München von Jörg Müller unterzeichnet.",
    "我的名字是张伟，电话13800138000，住在北京市朝阳区。",
    "こんにちは、佐藤です。明日の会議は午後三時からです。",
    "Émilie paid €49,90 at the café 🙂 and kept receipt n° 4411.",
    "Which court hears an appeal when a tenant sues the landlord after thirty days of notice?",
    "Mitochondria produce ATP through oxidative phosphorylation; chloroplasts capture light. " * 6,
    " ".join(
        f"Paragraph {i}: the committee reviewed clause {i * 7} of the supply contract, the shipping "
        f"schedule for week {i % 52 + 1}, and the open questions about pricing and delivery."
        for i in range(200)
    ),
)


class ExportError(RuntimeError):
    """The export failed or its output does not reproduce PyTorch; the message has the numbers."""


@dataclass(frozen=True)
class ParityInputs:
    """The parity texts tokenized as the sidecar does: one right-padded batch, and each row alone."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    rows: list[np.ndarray]


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    argmax_agreement: float
    compared: int
    """Texts (category) or real tokens (pii) compared, padded batch and single rows together."""
    batch_max_diff: float
    """Largest logit difference of a row run alone against the same row inside the padded batch."""


@dataclass(frozen=True)
class Calibration:
    """Texts for static INT8 ranges, and where they came from (files, or the built-in parity texts)."""

    texts: list[str]
    sources: list[str]


def parity_inputs(model_dir: ModelDir, max_tokens: int = PARITY_MAX_TOKENS) -> ParityInputs:
    tokenizer = model_dir.load_tokenizer()
    tokenizer.no_padding()
    tokenizer.enable_truncation(min(max_tokens, model_dir.max_position_embeddings))
    rows = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(list(PARITY_TEXTS))]
    input_ids, attention_mask = _right_padded(rows, model_dir.pad_token_id)
    return ParityInputs(input_ids, attention_mask, rows)


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id rows as one batch padded on the right, and its attention mask."""
    ids = np.full((len(rows), max(map(len, rows))), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def reference_logits(model, inputs: ParityInputs) -> list[np.ndarray]:
    """PyTorch logits for the padded batch, then for each row alone (the order `check_parity` expects)."""
    import torch

    with torch.inference_mode():
        return [
            model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()
            for ids, mask in _runs(inputs)
        ]


def check_parity(onnx_path: str | os.PathLike, inputs: ParityInputs, expected: list[np.ndarray], task: str) -> Parity:
    """Run the ONNX file in ONNX Runtime (CPU) on `inputs` and compare with PyTorch's `expected` logits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind exception types
        raise ExportError(f"{onnx_path}: ONNX Runtime cannot load it ({_one_line(e)})") from e

    token = get_task(task).head == "token"
    max_diff, batch_diff, agree, compared = 0.0, 0.0, 0, 0
    batched = None
    for run, ((ids, mask), want) in enumerate(zip(_runs(inputs), expected, strict=True)):
        try:
            (got,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        except Exception as e:
            raise ExportError(f"{onnx_path}: ONNX Runtime failed on a [{ids.shape[0]}, {ids.shape[1]}] batch "
                              f"({_one_line(e)})") from e
        if got.shape != want.shape:
            raise ExportError(f"{onnx_path}: logits have shape {list(got.shape)}, PyTorch gives {list(want.shape)}")
        if run == 0:
            batched = got
        else:  # row `run - 1` alone against its place in the padded batch
            inside = batched[run - 1, : ids.shape[1]] if token else batched[run - 1]
            batch_diff = _nan_max(batch_diff, float(np.abs(inside - got[0]).max()))
        if token:  # token logits: padding positions are never read
            real = mask.astype(bool)
            want, got = want[real], got[real]
        max_diff = _nan_max(max_diff, float(np.abs(want.astype(np.float64) - got).max()))
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        compared += want.shape[0]
    return Parity(max_abs_diff=max_diff, argmax_agreement=agree / compared, compared=compared,
                  batch_max_diff=batch_diff)


def _nan_max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _runs(inputs: ParityInputs) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield inputs.input_ids, inputs.attention_mask
    for row in inputs.rows:
        yield row[None, :], np.ones((1, len(row)), dtype=np.int64)


def export_model_dir(
    path: str | os.PathLike,
    int8: bool = False,
    tolerance: float | None = None,
    *,
    int8_min_agreement: float = INT8_MIN_AGREEMENT,
    quantization: str = "static",
    calibration: Sequence[str] | None = None,
) -> dict:
    """Write ``model.onnx`` (and ``model.int8.onnx``) into the model directory `path`; return the report.

    `quantization` is ``static`` (ranges from `calibration` files, default the recorded training files)
    or ``dynamic``. Raises ``ModelDirError`` for a missing or invalid directory and ``ExportError`` when
    the export cannot be made or does not reproduce PyTorch. A file that fails its check is not written;
    a new ``model.onnx`` replaces any older ``model.int8.onnx``, which no longer matches it.
    """
    import onnxruntime
    import torch

    tolerance = FP32_TOLERANCE if tolerance is None else tolerance
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ExportError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not 0.0 <= int8_min_agreement <= 1.0:
        raise ExportError(f"int8_min_agreement must be between 0 and 1, got {int8_min_agreement!r}")
    if quantization not in ("static", "dynamic"):
        raise ExportError(f"quantization must be 'static' or 'dynamic', got {quantization!r}")

    fill_special_token_ids(resolve(path))
    model_dir = ModelDir.read(path)
    if not model_dir.has_torch_weights:
        raise ExportError(f"{model_dir.path}: no PyTorch weights (model.safetensors); export needs the trained model")
    _read_results(model_dir.path)  # a corrupt file fails now, not after the export
    static = int8 and quantization == "static"
    if calibration is not None and not static:
        raise ExportError("calibration data is for static INT8: give it with int8 and quantization 'static'")
    calibrated = calibration_texts(model_dir, calibration) if static else None
    started = time.perf_counter()
    model = _load_model(model_dir)
    inputs = parity_inputs(model_dir)
    expected = reference_logits(model, inputs)
    report: dict = {
        "exporter": "torch.onnx dynamo",
        "opset": OPSET,
        "attn_implementation": ATTN_IMPLEMENTATION,
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "parity_texts": len(inputs.rows),
        "parity_max_tokens": int(inputs.input_ids.shape[1]),
    }
    with tempfile.TemporaryDirectory(dir=model_dir.path, prefix=".export-") as tmp:
        report |= _export_fp32(model, model_dir, Path(tmp), inputs, expected, tolerance)
        if int8:
            try:
                report |= _export_int8(model_dir, Path(tmp), inputs, expected, int8_min_agreement, calibrated)
            except _Int8Failed as failed:
                report |= failed.report | {"seconds": round(time.perf_counter() - started, 2)}
                _write_report(model_dir.path, report)
                raise ExportError(str(failed)) from None
    report["seconds"] = round(time.perf_counter() - started, 2)
    _write_report(model_dir.path, report)
    log.info("export_done", model=str(model_dir.path), int8=int8, seconds=report["seconds"])
    return report


class _Int8Failed(Exception):
    """The INT8 file disagrees with PyTorch too often; carries the report part to record anyway."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _export_fp32(model, model_dir: ModelDir, tmp: Path, inputs: ParityInputs, expected, tolerance: float) -> dict:
    """``model.onnx``, installed only when its logits match PyTorch's within `tolerance`; an older INT8 file
    no longer matches it and goes."""
    staged = tmp / ONNX_FILE
    _export_onnx(model, staged, model_dir)
    fp32 = check_parity(staged, inputs, expected, model_dir.task)
    log.info("export_onnx_checked", model=str(model_dir.path), max_abs_diff=fp32.max_abs_diff,
             argmax_agreement=fp32.argmax_agreement, compared=fp32.compared, tolerance=tolerance)
    if not fp32.max_abs_diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"{model_dir.path / ONNX_FILE}: ONNX logits differ from PyTorch by up to {fp32.max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}, argmax agreement {fp32.argmax_agreement:.3f} over {fp32.compared}); "
            "nothing was written"
        )
    report = {"onnx_file": ONNX_FILE, "onnx_bytes": _size(staged), "onnx_max_abs_diff": fp32.max_abs_diff,
              "onnx_argmax_agreement": fp32.argmax_agreement, "onnx_tolerance": tolerance}
    _install(staged, model_dir.path)
    stale = model_dir.path / ONNX_INT8_FILE
    if stale.exists():
        stale.unlink()
        log.info("export_stale_int8_removed", model=str(model_dir.path))
    return report


def _export_int8(model_dir: ModelDir, tmp: Path, inputs: ParityInputs, expected, min_agreement: float,
                 calibration: Calibration | None) -> dict:
    """``model.int8.onnx`` (static when there is a `calibration`, else dynamic), installed only when its
    argmax agrees with PyTorch's often enough."""
    quantized = tmp / ONNX_INT8_FILE
    batches = None if calibration is None else calibration_batches(model_dir, calibration.texts)
    _quantize(model_dir.path / ONNX_FILE, quantized, tmp, batches)
    q = check_parity(quantized, inputs, expected, model_dir.task)
    passed = q.argmax_agreement >= min_agreement and math.isfinite(q.max_abs_diff)
    report = {"int8_file": ONNX_INT8_FILE, "int8_bytes": _size(quantized),
              "int8_quantization": "dynamic" if calibration is None else "static",
              "int8_max_abs_diff": q.max_abs_diff, "int8_argmax_agreement": q.argmax_agreement,
              "int8_batch_max_diff": q.batch_max_diff, "int8_min_agreement": min_agreement, "int8_passed": passed}
    if calibration is not None:
        report["int8_calibration"] = {"texts": len(calibration.texts), "sources": calibration.sources}
    log.info("export_int8_checked", model=str(model_dir.path), max_abs_diff=q.max_abs_diff,
             argmax_agreement=q.argmax_agreement, batch_max_diff=q.batch_max_diff, compared=q.compared,
             min_agreement=min_agreement, quantization=report["int8_quantization"])
    if not passed:
        raise _Int8Failed(
            f"{model_dir.path / ONNX_INT8_FILE}: INT8 argmax agrees with PyTorch on {q.argmax_agreement:.3f} of "
            f"{q.compared} (minimum {min_agreement:g}; max abs logit difference {q.max_abs_diff:.3g}); "
            "model.onnx was written, the INT8 file was not", report)
    _install(quantized, model_dir.path)
    return report


def calibration_texts(model_dir: ModelDir, sources: Sequence[str] | None = None,
                      limit: int = CALIBRATION_TEXTS, seed: int = CALIBRATION_SEED) -> Calibration:
    """A seeded uniform sample (one pass, `limit` texts held) of the texts in `sources`.

    Without `sources`, the training sources ``eval_results.json`` records, each found as written or
    beside the model directory (a checkout-relative path from any working directory), in the text column
    the model was trained on (Presidio ``full_text`` too): ranges measured on what the model learnt from.
    A named source that cannot be read or holds no text is an error; a recorded one is skipped with a
    warning, and when none is left the fixed parity texts set the ranges, as the report then says.
    """
    recorded = model_dir.eval_results().get("data") or {}
    column = recorded.get("text_column", "text")
    named = sources is not None
    files = list(sources) if named else _recorded_sources(recorded.get("train"), model_dir.path)
    rng, texts, seen, used = random.Random(seed), [], 0, []
    for source in files:
        before = seen
        try:
            for _, record in read_records(source):
                text = _calibration_text(record, column)
                if text is None:
                    continue
                seen += 1
                if len(texts) < limit:
                    texts.append(text)
                elif (slot := rng.randrange(seen)) < limit:
                    texts[slot] = text
        except (OSError, DataError) as e:
            raise ExportError(f"calibration data: {_one_line(e)}") from e
        if seen > before:
            used.append(source)
        elif named:
            raise ExportError(f"calibration data {source}: no row has a non-empty '{column}'")
        else:
            log.warning("export_calibration_source_without_text", model=str(model_dir.path), source=source,
                        column=column)
    if not texts:
        log.warning("export_calibration_builtin", model=str(model_dir.path), reason="no recorded training text found")
        return Calibration(texts=list(PARITY_TEXTS), sources=["built-in parity texts"])
    return Calibration(texts=texts, sources=used)


def _recorded_sources(train: object, model_path: Path) -> list[str]:
    """The recorded training files that can still be found; a missing one is a warning, not an error."""
    files = []
    for source in (s for s in train if isinstance(s, str)) if isinstance(train, list) else ():
        found = _locate(source, model_path)
        if found is None:
            log.warning("export_calibration_source_missing", model=str(model_path), source=source)
        else:
            files.append(found)
    return files


def _calibration_text(record: dict, column: str) -> str | None:
    for key in (column, "full_text"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _locate(source: str, model_path: Path) -> str | None:
    """`source` as written if it exists, else the first folder above the model directory that holds it."""
    path = Path(source)
    if path.exists():
        return source
    if not path.is_absolute():
        for folder in model_path.resolve().parents:
            if (folder / path).exists():
                return str(folder / path)
    return None


def calibration_batches(model_dir: ModelDir, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """`texts` tokenized as served (the trained window, first window of a long text), right-padded in batches."""
    tokenizer = model_dir.load_tokenizer()
    tokenizer.no_padding()
    tokenizer.enable_truncation(min(model_dir.trained_length or 512, model_dir.max_position_embeddings))
    batches = []
    for at in range(0, len(texts), CALIBRATION_BATCH):
        rows = [e.ids for e in tokenizer.encode_batch(list(texts[at : at + CALIBRATION_BATCH]))]
        ids, mask = _right_padded(rows, model_dir.pad_token_id)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def fill_special_token_ids(directory: Path) -> dict[str, int]:
    """Write the CLS/SEP/PAD ids that ``config.json`` lacks, taken from the directory's tokenizer; return them.

    For directories trained before the trainer wrote them (BERT-family bases); ``{}`` when nothing was
    missing. A directory that is not a model directory is left alone for ``ModelDir.read`` to name.
    """
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(config, dict) or not (directory / TOKENIZER_FILE).is_file():
        return {}
    if all(isinstance(config.get(k), int) and not isinstance(config.get(k), bool) for k in SPECIAL_TOKEN_IDS):
        return {}
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers raises OSError, ValueError, ...
        raise ExportError(f"{directory}: {CONFIG_FILE} lacks special token ids and the tokenizer that would "
                          f"give them cannot be loaded ({_one_line(e)})") from e
    try:
        filled = missing_special_token_ids(config, tokenizer, str(directory))
    except BaseModelError as e:
        raise ExportError(str(e)) from e
    config.update(filled)
    staged = config_path.with_name(config_path.name + ".tmp")
    staged.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staged, config_path)
    log.info("export_special_token_ids_filled", model=str(directory), **filled)
    return filled


def _load_model(model_dir: ModelDir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForSequenceClassification if model_dir.spec.head == "sequence" else AutoModelForTokenClassification
    try:
        model = auto.from_pretrained(model_dir.path, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError, ValueError, RuntimeError, ...
        raise ExportError(f"{model_dir.path}: PyTorch cannot load the model ({_one_line(e)})") from e
    return model.eval()


def _export_onnx(model, out: Path, model_dir: ModelDir) -> None:
    """Export with dynamic batch and sequence axes and save one self-contained file where possible."""
    import onnx
    import torch

    ids = torch.arange(2 * 16, dtype=torch.int64).reshape(2, 16) % model.config.vocab_size
    ids[:, 0] = model_dir.cls_token_id
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    axes = {0: "batch", 1: "sequence"}
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (), None,
                kwargs={"input_ids": ids, "attention_mask": mask},
                dynamo=True,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                opset_version=OPSET,
                dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                verbose=False,
            )
    except Exception as e:  # torch.export and the ONNX translator raise many types
        raise ExportError(f"{model_dir.path}: torch.onnx.export failed ({_one_line(e)})") from e

    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    # The exporter also records the shapes of initializers as value_info. The quantizer turns a Gemm with
    # transB (BERT's pooler and classifier) into a MatMul on the transposed weight, and the stale entry
    # then fails its shape inference; an initializer's shape is in the initializer anyway.
    initializers = {init.name for init in proto.graph.initializer}
    kept = [vi for vi in proto.graph.value_info if vi.name not in initializers]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, out, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data")
    else:
        onnx.save_model(proto, out)


def _quantize(src: Path, dst: Path, workdir: Path, calibration: list[dict[str, np.ndarray]] | None) -> None:
    """INT8 after ONNX Runtime's pre-processing (shape inference, folding): static (QDQ, per-channel QInt8
    weights, QUInt8 activations with MinMax ranges from `calibration`), or dynamic without it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst, workdir = src.resolve(), dst.resolve(), workdir.resolve()  # the paths outlive the chdir below
    prepared = workdir / "model.prepared.onnx"
    try:
        # ORT's symbolic shape inference leaves scratch files (sym_shape_infer_temp.onnx, <uuid>.data) in
        # the working directory: run it in the export's own scratch folder, not the user's.
        with _quiet(), contextlib.chdir(workdir):
            try:
                quant_pre_process(str(src), str(prepared))
            except Exception as e:
                # ORT's symbolic shape inference cannot broadcast Min(max_positions, sequence) against
                # sequence: the slice of a position-id buffer (BERT family). ONNX's own inference is enough
                # for quantization, and the parity check judges the result either way.
                log.info("export_symbolic_shape_inference_skipped", model=str(src), reason=_one_line(e))
                quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            if calibration is None:
                quantize_dynamic(prepared, dst, weight_type=QuantType.QInt8)
            else:
                _quantize_static(prepared, dst, calibration)
    except Exception as e:
        raise ExportError(f"{src}: INT8 quantization failed ({_one_line(e)})") from e


def _quantize_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    products, matmuls = _activation_products(src)
    if matmuls and len(products) == matmuls:  # every weight would stay fp32: a graph this export does not know
        raise ExportError(f"{src.name}: no MatMul takes a weight directly; nothing to quantize statically "
                          "(use dynamic quantization)")
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                    nodes_to_exclude=products, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"CalibMovingAverage": True})


def _activation_products(path: Path) -> tuple[list[str], int]:
    """MatMuls of two activations (attention's scores and weighted values): left in fp32, as dynamic INT8
    leaves them. Quantizing them costs more than it saves on a sequence-squared tensor (a 512-token batch
    of 32 ran 30% slower than fp32) and changes the attention pattern itself."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    return [n.name for n in matmuls if not any(name in weights for name in n.input)], len(matmuls)


def _install(staged: Path, directory: Path) -> None:
    """Move a checked file, and its external data file if it has one, into the model directory."""
    os.replace(staged, directory / staged.name)
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, directory / data.name)
    elif (directory / data.name).exists():
        (directory / data.name).unlink()  # left by an older export that needed external data


def _read_results(directory: Path) -> dict:
    try:
        return read_results(directory)
    except EvalResultsError as e:
        raise ExportError(f"{e}; cannot add the export report") from e


def _write_report(directory: Path, report: dict) -> None:
    """The export's own section of eval_results.json ("export"); every other key is kept."""
    _read_results(directory)  # a corrupt file is an ExportError, not a crash
    update_results(directory, export=report)


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and quantizer warn about internals (axis renames, deprecations) users cannot act on."""
    with warnings.catch_warnings():
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        yield


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
