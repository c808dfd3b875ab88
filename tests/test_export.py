"""`trainer export`: ONNX files with dynamic axes that reproduce PyTorch, or a loud failure; static INT8
whose result for a text does not depend on its batch.

Two real exports (one per task) are shared by the module; failure tests inject a bad graph in place of
the exporter's output so they need no export of their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from model_contract.model_dir import ModelDir, ModelDirError
from tests.conftest import CATEGORY_LABELS, PII_LABELS, read_json
from trainer import export
from trainer.export import ExportError, export_model_dir

# The fixtures are untrained: their logits are near ties, so INT8 rounding flips some argmaxes that a
# trained model would keep. The agreement threshold itself is tested with a broken INT8 file below.
UNTRAINED_INT8_MIN_AGREEMENT = 0.5


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def exported_category(tiny_category_dir, tmp_path_factory) -> tuple[Path, dict]:
    path = _copy(tiny_category_dir, tmp_path_factory.mktemp("export") / "category")
    (path / "eval_results.json").write_text(json.dumps({"eval_f1": 0.5, "train_size": 60}))
    report = export_model_dir(path, int8=True, int8_min_agreement=UNTRAINED_INT8_MIN_AGREEMENT)
    return path, report


@pytest.fixture(scope="module")
def exported_pii(tiny_pii_dir, tmp_path_factory) -> tuple[Path, dict]:
    path = _copy(tiny_pii_dir, tmp_path_factory.mktemp("export") / "pii")
    report = export_model_dir(path, int8=True, int8_min_agreement=UNTRAINED_INT8_MIN_AGREEMENT)
    return path, report


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _torch_logits(model_dir: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    task = ModelDir.read(model_dir).task
    auto = AutoModelForSequenceClassification if task == "category" else AutoModelForTokenClassification
    model = auto.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def _scale_initializer(path: Path, name_part: str, factor: float) -> None:
    """Tamper with a graph: multiply the first initializer whose name contains `name_part`."""
    model = onnx.load(path)
    for init in model.graph.initializer:
        if name_part in init.name and init.data_type == onnx.TensorProto.FLOAT:
            arr = onnx.numpy_helper.to_array(init) * factor
            init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
            onnx.save(model, path)
            return
    raise AssertionError(f"no float initializer named like {name_part!r}")


@pytest.mark.parametrize("fixture, labels", [("exported_category", CATEGORY_LABELS), ("exported_pii", PII_LABELS)])
def test_export_declares_dynamic_batch_and_sequence_axes(request, fixture, labels):
    path, _ = request.getfixturevalue(fixture)
    graph = onnx.load(path / "model.onnx").graph
    assert {i.name: _dims(i) for i in graph.input} == {
        "input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]
    }
    assert [o.name for o in graph.output] == ["logits"]
    expected = ["batch", len(labels)] if fixture == "exported_category" else ["batch", "sequence", len(labels)]
    assert _dims(graph.output[0]) == expected


@pytest.mark.parametrize("fixture", ["exported_category", "exported_pii"])
def test_onnx_runs_batches_of_different_sizes_and_lengths_like_pytorch(request, fixture):
    path, _ = request.getfixturevalue(fixture)
    session = _session(path / "model.onnx")
    rng = np.random.default_rng(0)
    for batch, length in [(1, 5), (3, 37), (3, 200)]:
        ids = rng.integers(5, 600, (batch, length)).astype(np.int64)
        mask = np.ones_like(ids)
        (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        assert logits.shape[0] == batch and (fixture == "exported_category" or logits.shape[1] == length)
        np.testing.assert_allclose(logits, _torch_logits(path, ids, mask), atol=1e-4)


def test_onnx_file_is_self_contained_without_build_paths(exported_category):
    path, _ = exported_category
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("model")) == [
        "model.int8.onnx", "model.onnx", "model.safetensors"
    ]
    assert not [p for p in path.iterdir() if p.name.startswith(".export")]
    model = onnx.load(path / "model.onnx", load_external_data=False)
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    assert not any(n.metadata_props for n in model.graph.node)
    assert b"site-packages" not in (path / "model.onnx").read_bytes()


@pytest.mark.parametrize("fixture", ["exported_category", "exported_pii"])
def test_int8_file_is_smaller_and_loads(request, fixture):
    path, report = request.getfixturevalue(fixture)
    assert (path / "model.int8.onnx").stat().st_size < (path / "model.onnx").stat().st_size / 2
    assert report["int8_bytes"] == (path / "model.int8.onnx").stat().st_size
    ops = {n.op_type for n in onnx.load(path / "model.int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    assert report["int8_quantization"] == "static"
    assert ModelDir.read(path).onnx_int8_path == path / "model.int8.onnx"


def _alone_and_beside(path: Path, short: str, long: str) -> tuple[np.ndarray, np.ndarray]:
    """INT8 logits of `short` run alone, and of `short` padded in one batch with `long`."""
    model_dir = ModelDir.read(path)
    tokenizer = model_dir.load_tokenizer()
    tokenizer.no_padding()
    a, b = (np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch([short, long]))
    ids = np.full((2, len(b)), model_dir.pad_token_id, dtype=np.int64)
    ids[0, : len(a)], ids[1] = a, b
    mask = (np.arange(len(b))[None, :] < np.array([[len(a)], [len(b)]])).astype(np.int64)
    session = _session(path / "model.int8.onnx")
    (alone,) = session.run(["logits"], {"input_ids": a[None, :], "attention_mask": np.ones((1, len(a)), np.int64)})
    (batched,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    return alone[0], batched[0, : len(a)]


def test_static_int8_gives_a_text_the_same_logits_whatever_shares_its_batch(exported_pii, tiny_pii_dir, tmp_path):
    short, long = "Call Jane Roe at 415 555 0100.", "ZQX 999999 ### " * 40 + "€€€ 我的名字 " * 20
    alone, batched = _alone_and_beside(exported_pii[0], short, long)
    np.testing.assert_array_equal(alone, batched)
    assert exported_pii[1]["int8_batch_max_diff"] == 0.0
    # The property is not free: dynamic INT8 scales activations by the whole batch's range.
    dynamic = _copy(tiny_pii_dir, tmp_path / "dynamic")
    report = export_model_dir(dynamic, int8=True, int8_min_agreement=0.0, quantization="dynamic")
    assert report["int8_quantization"] == "dynamic" and "int8_calibration" not in report
    alone, batched = _alone_and_beside(dynamic, short, long)
    assert np.abs(alone - batched).max() > 1e-4 and report["int8_batch_max_diff"] > 1e-4


def test_static_int8_calibrates_on_the_training_files_the_directory_records(tiny_pii_dir, tmp_path):
    path = _copy(tiny_pii_dir, tmp_path / "m")
    train = tmp_path / "train.jsonl"
    rows = [{"text": f"Row {i}: Ada Lovelace wrote to ada{i}@example.org", "spans": []} for i in range(700)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"full_text": "Presidio row", "spans": []}))
    (path / "eval_results.json").write_text(json.dumps({"data": {"train": [str(train), str(tmp_path / "gone.jsonl")]}}))
    report = export_model_dir(path, int8=True, int8_min_agreement=0.0)
    assert report["int8_calibration"] == {"texts": export.CALIBRATION_TEXTS, "sources": [str(train)]}


def test_calibration_finds_checkout_relative_sources_from_any_directory_in_the_trained_column(
        tiny_category_dir, tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    path = _copy(tiny_category_dir, checkout / "models" / "category")
    (checkout / "data").mkdir()
    (checkout / "data" / "train.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i} + {i}?", "label": "math"}) + "\n" for i in range(40)))
    (path / "eval_results.json").write_text(json.dumps({"data": {"train": ["data/train.jsonl"], "text_column": "question"}}))
    monkeypatch.chdir(tmp_path)  # neither the checkout nor the model directory
    calibration = export.calibration_texts(ModelDir.read(path))
    assert calibration.sources == [str(checkout / "data" / "train.jsonl")]
    assert sorted(calibration.texts) == sorted(f"What is {i} + {i}?" for i in range(40))
    again = export.calibration_texts(ModelDir.read(path), limit=8)
    assert len(again.texts) == 8 and again == export.calibration_texts(ModelDir.read(path), limit=8)  # seeded


def test_calibration_data_without_static_int8_is_a_clear_error(tiny_category_dir, tmp_path):
    for kwargs in ({"int8": False}, {"int8": True, "quantization": "dynamic"}):
        with pytest.raises(ExportError, match="calibration data is for static INT8"):
            export_model_dir(tiny_category_dir, calibration=[str(tmp_path / "train.jsonl")], **kwargs)


def test_static_int8_without_training_files_calibrates_on_the_parity_texts(exported_category):
    calibration = exported_category[1]["int8_calibration"]
    assert calibration == {"texts": len(export.PARITY_TEXTS), "sources": ["built-in parity texts"]}


def test_named_calibration_data_that_cannot_be_used_is_a_clear_error(tiny_category_dir, tmp_path, reuse_export):
    path = _copy(tiny_category_dir, tmp_path / "m")
    with pytest.raises(ExportError, match="calibration data: .*missing.jsonl"):
        export_model_dir(path, int8=True, calibration=[str(tmp_path / "missing.jsonl")])
    textless = tmp_path / "textless.jsonl"
    textless.write_text(json.dumps({"question": "no text column"}) + "\n")
    with pytest.raises(ExportError, match="textless.jsonl: no row has a non-empty 'text'"):
        export_model_dir(path, int8=True, calibration=[str(textless)])
    with pytest.raises(ExportError, match="quantization must be 'static' or 'dynamic'"):
        export_model_dir(path, int8=True, quantization="float8")


def test_parity_numbers_are_merged_into_eval_results(exported_category):
    path, report = exported_category
    results = read_json(path / "eval_results.json")
    assert results["eval_f1"] == 0.5 and results["train_size"] == 60
    assert results["export"] == report
    assert 0 <= report["onnx_max_abs_diff"] <= 1e-4
    assert report["onnx_argmax_agreement"] == 1.0
    assert report["onnx_tolerance"] == export.FP32_TOLERANCE
    assert report["int8_max_abs_diff"] > report["onnx_max_abs_diff"]
    assert report["int8_argmax_agreement"] >= UNTRAINED_INT8_MIN_AGREEMENT and report["int8_passed"] is True
    assert report["parity_texts"] == len(export.PARITY_TEXTS)
    assert report["parity_max_tokens"] == 512  # the long text reaches the tiny model's whole window
    assert report["opset"] == export.OPSET and report["exporter"]


def test_pii_parity_compares_only_real_tokens(exported_pii):
    path, _ = exported_pii
    model_dir = ModelDir.read(path)
    inputs = export.parity_inputs(model_dir)
    expected = export.reference_logits(export._load_model(model_dir), inputs)
    padding = inputs.attention_mask == 0
    assert padding.any()
    expected[0][padding] = 1e6  # padded positions are never read, so they must not count
    parity = export.check_parity(path / "model.onnx", inputs, expected, "pii")
    assert parity.max_abs_diff < 1e-4 and parity.argmax_agreement == 1.0
    assert parity.compared == 2 * int(inputs.attention_mask.sum())  # padded batch, then each row alone


def test_parity_inputs_cover_short_long_and_non_ascii_texts(tiny_category_dir):
    inputs = export.parity_inputs(ModelDir.read(tiny_category_dir))
    lengths = sorted(len(r) for r in inputs.rows)
    assert lengths[0] <= 8 and lengths[-1] == 512
    assert inputs.input_ids.shape == (len(export.PARITY_TEXTS), 512)
    assert any(any(ord(ch) > 0x3000 for ch in t) for t in export.PARITY_TEXTS)


@pytest.fixture
def reuse_export(exported_category, monkeypatch):
    """Stand-in for the exporter that copies the module's real export (so failure tests export nothing)."""
    good, _ = exported_category

    def fake_export(model, out, model_dir):
        shutil.copy(good / "model.onnx", out)

    monkeypatch.setattr(export, "_export_onnx", fake_export)
    return good


def test_absurdly_small_tolerance_fails_and_writes_nothing(tiny_category_dir, tmp_path, reuse_export):
    path = _copy(tiny_category_dir, tmp_path / "m")
    with pytest.raises(ExportError, match=r"differ from PyTorch by up to .*tolerance 1e-12"):
        export_model_dir(path, tolerance=1e-12)
    assert not (path / "model.onnx").exists() and not (path / "eval_results.json").exists()
    assert not [p for p in path.iterdir() if p.name.startswith(".export")]


def test_tampered_graph_fails_loudly(tiny_category_dir, tmp_path, exported_category, monkeypatch):
    good, _ = exported_category

    def tampered_export(model, out, model_dir):
        shutil.copy(good / "model.onnx", out)
        _scale_initializer(out, "classifier", 3.0)

    monkeypatch.setattr(export, "_export_onnx", tampered_export)
    path = _copy(tiny_category_dir, tmp_path / "m")
    with pytest.raises(ExportError, match=r"model\.onnx: ONNX logits differ from PyTorch by up to \d"):
        export_model_dir(path)
    assert not (path / "model.onnx").exists()


def test_int8_below_minimum_agreement_fails_but_keeps_fp32(tiny_category_dir, tmp_path, reuse_export, monkeypatch):
    real_quantize = export._quantize

    def broken_quantize(src, dst, workdir, calibration):
        real_quantize(src, dst, workdir, calibration)
        model = onnx.load(dst)
        for init in model.graph.initializer:  # scramble the classifier weights' scale: decisions change
            if "classifier" in init.name and init.data_type == onnx.TensorProto.FLOAT:
                arr = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array(-arr * 50, init.name))
        onnx.save(model, dst)

    monkeypatch.setattr(export, "_quantize", broken_quantize)
    path = _copy(tiny_category_dir, tmp_path / "m")
    with pytest.raises(ExportError, match=r"INT8 argmax agrees with PyTorch on 0\.\d+ of \d+ \(minimum 0\.9"):
        export_model_dir(path, int8=True)
    assert (path / "model.onnx").exists() and not (path / "model.int8.onnx").exists()
    report = read_json(path / "eval_results.json")["export"]
    assert report["int8_passed"] is False and report["int8_argmax_agreement"] < 0.9


def test_new_fp32_export_removes_a_stale_int8_file(tiny_category_dir, tmp_path, reuse_export):
    path = _copy(tiny_category_dir, tmp_path / "m")
    (path / "model.int8.onnx").write_bytes(b"from an older model")
    report = export_model_dir(path)
    assert not (path / "model.int8.onnx").exists()
    assert "int8_file" not in report


def test_directory_without_pytorch_weights_is_a_clear_error(exported_category, tmp_path):
    path = _copy(exported_category[0], tmp_path / "onnx_only")
    (path / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no PyTorch weights"):
        export_model_dir(path)


def test_missing_directory_raises_model_dir_error(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        export_model_dir(tmp_path / "nope")


def test_directory_that_is_not_a_model_raises_model_dir_error(tmp_path):
    with pytest.raises(ModelDirError, match="no config.json"):
        export_model_dir(tmp_path)


@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), float("inf")])
def test_bad_tolerance_is_a_clear_error(tiny_category_dir, tolerance):
    with pytest.raises(ExportError, match="tolerance must be a finite number"):
        export_model_dir(tiny_category_dir, tolerance=tolerance)


def test_corrupt_eval_results_fails_before_exporting_and_is_kept(tiny_category_dir, tmp_path, monkeypatch):
    def must_not_export(*args):
        raise AssertionError("exported despite a corrupt eval_results.json")

    monkeypatch.setattr(export, "_export_onnx", must_not_export)
    path = _copy(tiny_category_dir, tmp_path / "m")
    (path / "eval_results.json").write_text("{not json")
    with pytest.raises(ExportError, match="eval_results.json: not valid JSON"):
        export_model_dir(path)
    assert (path / "eval_results.json").read_text() == "{not json"
