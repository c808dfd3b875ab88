"""Any Hugging Face encoder as `--base-model`, BERT family included: train, export, serve.

A tiny BertModel with its own WordPiece tokenizer (built offline, like all-MiniLM-L6-v2 in shape: a
``BertModel`` whose config carries only ``pad_token_id``) goes through `trainer category`/`trainer pii`
and `trainer export --int8`, and the sidecar's Engine serves the result from ONNX.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from model_contract.model_dir import ModelDir
from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig
from sidecar.inference.engine import Engine
from tests.conftest import read_json
from tests.factories import category_rows, corpus_file, write_jsonl
from tests.trainer_helpers import FAST, SPAN_ROWS, run_cli, save_tiny_bert, wordpiece_tokenizer
from trainer.cli import main
from trainer.train import BaseModelError, missing_special_token_ids

PII_ENTITIES = {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER"}


def _token_ids(base: Path) -> dict[str, int]:
    vocab = read_json(base / "tokenizer.json")["model"]["vocab"]
    return {"cls_token_id": vocab["[CLS]"], "sep_token_id": vocab["[SEP]"], "pad_token_id": vocab["[PAD]"]}


@pytest.fixture(scope="module")
def bert_category_exported(bert_category) -> Path:
    assert main(["export", str(bert_category), "--int8"]) == 0
    return bert_category


def _engine(path: Path, task: str, runtime: str) -> Engine:
    model = ModelConfig(path=str(path), runtime=runtime, device="cpu", stride=4)  # windows of 16-32 tokens
    return Engine.load(ModelsConfig(**{task: model}), BatchingConfig(), checksums=False)


@pytest.mark.slow
def test_bert_base_trains_into_a_config_with_cls_sep_pad_ids_from_its_tokenizer(bert_base, bert_category):
    config = read_json(bert_category / "config.json")
    assert {k: config[k] for k in ("cls_token_id", "sep_token_id", "pad_token_id")} == _token_ids(bert_base)
    assert config["sidecar_task"] == "category" and config["sidecar_max_length"] == 32
    md = ModelDir.read(bert_category, expect_task="category")
    assert md.labels == ["biology", "law", "math"] and md.trained_length == 32


@pytest.mark.slow
def test_exported_bert_graph_takes_only_int64_input_ids_and_attention_mask(bert_category_exported):
    import onnx

    for name in ("model.onnx", "model.int8.onnx"):
        graph = onnx.load(bert_category_exported / name).graph
        inputs = {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                  for i in graph.input}
        assert inputs == {"input_ids": (onnx.TensorProto.INT64, ["batch", "sequence"]),
                          "attention_mask": (onnx.TensorProto.INT64, ["batch", "sequence"])}, name
        assert [o.name for o in graph.output] == ["logits"]
    report = read_json(bert_category_exported / "eval_results.json")["export"]
    assert report["onnx_max_abs_diff"] <= 1e-3 and report["int8_passed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_sidecar_engine_classifies_with_the_exported_bert_model(bert_category_exported, runtime):
    engine = _engine(bert_category_exported, "category", runtime)
    try:
        assert engine.describe()["category"]["runtime"] == runtime
        texts = ["Which organelle makes ATP in the cell?", "Is a contract signed under duress enforceable?",
                 "Émilie paid €49,90 at the café 🙂 " * 30]  # the last one is longer than the 32-token window
        results = engine.classify_many(texts)
    finally:
        engine.close()
    assert len(results) == len(texts)
    assert all(r.label in {"biology", "law", "math"} and 0 < r.confidence <= 1 for r in results)


@pytest.mark.slow
def test_bert_pii_model_trains_exports_and_serves_from_onnx(bert_base, tmp_path):
    spans = write_jsonl(tmp_path / "spans.jsonl", SPAN_ROWS * 3)
    out = tmp_path / "pii"
    assert main(["pii", "--train", str(spans), "--base-model", str(bert_base), "--output", str(out),
                 "--max-length", "16", "--stride", "4", *FAST]) == 0
    config = read_json(out / "config.json")
    assert {k: config[k] for k in ("cls_token_id", "sep_token_id", "pad_token_id")} == _token_ids(bert_base)
    assert config["sidecar_max_length"] == 16
    assert main(["export", str(out), "--int8"]) == 0

    engine = _engine(out, "pii", "onnx-int8")
    try:
        texts = ["Email John Smith at john.smith@example.com today.", "我的名字是张伟，邮箱 zhang.wei@example.cn。"]
        results = engine.detect_pii_many(texts)
    finally:
        engine.close()
    assert len(results) == len(texts)
    for text, result in zip(texts, results, strict=True):
        assert all(s.label in PII_ENTITIES and 0 <= s.start < s.end <= len(text) for s in result.spans)


@pytest.mark.slow
def test_export_fills_missing_token_ids_of_a_directory_trained_before_they_were_written(
    bert_base, bert_category, tmp_path, capsys
):
    old = tmp_path / "old"
    shutil.copytree(bert_category, old, ignore=shutil.ignore_patterns("*.onnx", "runs"))
    config = read_json(old / "config.json")
    del config["cls_token_id"], config["sep_token_id"]
    (old / "config.json").write_text(json.dumps(config))

    code, stdout, stderr = run_cli(capsys, "export", old)

    assert code == 0, stderr
    assert "exported model.onnx" in stdout
    config = read_json(old / "config.json")
    assert {k: config[k] for k in ("cls_token_id", "sep_token_id", "pad_token_id")} == _token_ids(bert_base)
    assert config["sidecar_task"] == "category" and config["id2label"]  # everything else kept
    engine = _engine(old, "category", "onnx")
    try:
        assert engine.classify_many(["Solve for x: 3x + 5 = 11."])[0].label in {"biology", "law", "math"}
    finally:
        engine.close()


@pytest.mark.slow
def test_base_whose_tokenizer_has_no_cls_token_fails_before_training_naming_it(tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast

    tok = wordpiece_tokenizer(corpus_file(tmp_path / "corpus.txt").read_text(encoding="utf-8").splitlines())
    base = save_tiny_bert(tmp_path / "no_cls", PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                                  pad_token="[PAD]"))
    train = write_jsonl(tmp_path / "train.jsonl", category_rows(6))
    out = tmp_path / "out"

    code, _, stderr = run_cli(capsys, "category", "--train", train, "--base-model", base, "--output", out, *FAST)

    assert code == 2
    assert str(base) in stderr and "no CLS token" in stderr and "'cls_token_id'" in stderr
    assert not out.exists()


def test_missing_token_ids_come_from_the_tokenizer_and_set_ones_are_kept():
    tokenizer = SimpleNamespace(cls_token_id=2, sep_token_id=3, pad_token_id=0)
    assert missing_special_token_ids({"pad_token_id": 0}, tokenizer, "base") == {"cls_token_id": 2, "sep_token_id": 3}
    config = {"cls_token_id": 7, "sep_token_id": 8, "pad_token_id": 1}
    assert missing_special_token_ids(config, tokenizer, "base") == {}
    assert missing_special_token_ids({"cls_token_id": True, "sep_token_id": None, "pad_token_id": 1}, tokenizer,
                                     "base") == {"cls_token_id": 2, "sep_token_id": 3}


def test_token_id_missing_from_config_and_tokenizer_is_an_error_naming_the_base_model():
    tokenizer = SimpleNamespace(cls_token_id=2, sep_token_id=None, pad_token_id=0)
    with pytest.raises(BaseModelError, match=r"^org/encoder: the tokenizer has no SEP token and the config no "
                                             r"'sep_token_id'"):
        missing_special_token_ids({"pad_token_id": 0}, tokenizer, "org/encoder")
