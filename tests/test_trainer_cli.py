"""The `trainer` CLI end to end on a tiny ModernBERT: train a few steps, read the directory, evaluate, export."""

import json
import shutil

import numpy as np
import pytest

from model_contract.model_dir import ModelDir
from tests.factories import category_rows, corpus_file, write_jsonl
from tests.trainer_helpers import SPAN_ROWS, run_cli, write_presidio
from trainer.cli import main

FAST = ["--max-steps", "4", "--eval-steps", "2", "--logging-steps", "2"]


@pytest.fixture(scope="module")
def category_model(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("category_cli")
    train = write_jsonl(root / "train.jsonl", category_rows(12))
    out = root / "model"
    code = main(["category", "--train", str(train), "--base-model", str(tiny_base), "--output", str(out),
                 "--max-length", "64", "--int8", *FAST])
    assert code == 0
    return out, train


@pytest.fixture(scope="module")
def pii_model(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("pii_cli")
    spans = write_jsonl(root / "spans.jsonl", SPAN_ROWS * 6)
    presidio = write_presidio(root / "presidio.json")
    out = root / "model"
    out.mkdir()
    (out / "model.int8.onnx").write_bytes(b"an export of some earlier model")
    code = main(["pii", "--train", str(spans), str(presidio), "--base-model", str(tiny_base), "--output", str(out),
                 "--max-length", "16", "--stride", "4", *FAST])
    assert code == 0
    return out, spans, presidio


@pytest.mark.slow
def test_category_run_writes_a_model_directory_the_sidecar_reads(category_model):
    out, _ = category_model
    md = ModelDir.read(out, expect_task="category")
    assert md.labels == ["biology", "law", "math"]
    assert md.onnx_path is not None and md.onnx_int8_path is not None and md.has_torch_weights

    results = md.eval_results()
    assert set(results["metrics"]) == {"accuracy", "f1", "precision", "recall"}
    assert set(results["per_class"]) == {"biology", "law", "math"}
    assert results["data"]["train_examples"] + results["data"]["validation_examples"] == 36
    assert results["data"]["validation_from"] == "stratified split"
    assert results["settings"]["max_steps"] == 4 and results["settings"]["batch_size"] == 4  # <1000-row rule
    assert results["training"]["steps"] == 4 and results["hardware"]["fp16"] is False
    assert results["time"]["total_seconds"] > 0 and results["base_model"]
    assert results["export"]["onnx_max_abs_diff"] <= 1e-3

    assert not (out / "checkpoints").exists()
    assert list((out / "runs").glob("events.out.tfevents.*"))
    card = (out / "README.md").read_text()
    assert "## Validation metrics" in card and "| biology |" in card and "## Export" in card


@pytest.mark.slow
def test_exported_onnx_matches_the_pytorch_logits(category_model):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = category_model
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = tok(["Which organelle makes ATP?", "Is a contract signed under duress enforceable in court?"],
              padding=True, return_tensors="np")
    with torch.inference_mode():
        expected = model(input_ids=torch.from_numpy(enc["input_ids"]),
                         attention_mask=torch.from_numpy(enc["attention_mask"])).logits.numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                      "attention_mask": enc["attention_mask"].astype(np.int64)})
    np.testing.assert_allclose(got, expected, atol=1e-3)


@pytest.mark.slow
def test_evaluate_category_writes_report_table_and_confusion_matrix(category_model, capsys, tmp_path):
    out, train = category_model
    code, stdout, _ = run_cli(capsys, "evaluate", out, "--data", train, "--output", tmp_path / "r" / "report.json")
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["task"] == "category" and report["examples"] == 36
    assert report["runtime"] == "onnx-int8" and report["max_length"] == 64  # as served: INT8 on CPU, trained window
    assert report["coverage"][0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": report["accuracy"]}
    assert report["at_routing_threshold"]["threshold"] == 0.5
    assert sum(row["support"] for row in report["per_class"].values()) == 36
    assert np.asarray(report["confusion_matrix"]["matrix"]).sum() == 36
    png = tmp_path / "r" / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "class" in stdout and "biology" in stdout and "precision" in stdout


@pytest.mark.slow
def test_evaluate_rejects_labels_the_model_does_not_have_unless_asked_to_drop_them(category_model, capsys, tmp_path):
    out, _ = category_model
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "q one", "label": "law"}, {"text": "q two", "label": "poetry"}])
    code, _, err = run_cli(capsys, "evaluate", out, "--data", data, "--confusion-matrix", tmp_path / "cm.png")
    assert code == 2 and err.strip() == f"error: {data}:2: unknown label 'poetry' (not in the model's labels: biology, law, math)"
    code, _, _ = run_cli(capsys, "evaluate", out, "--data", data, "--drop-unknown-labels",
                         "--output", tmp_path / "r.json", "--confusion-matrix", tmp_path / "cm.png")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["examples"] == 1 and report["dropped_unknown_labels"] == 1


@pytest.mark.slow
def test_pii_run_on_span_jsonl_plus_presidio_writes_bio_labels_and_entity_metrics(pii_model):
    out, _, _ = pii_model
    md = ModelDir.read(out, expect_task="pii")
    assert md.labels == ["O", "B-EMAIL_ADDRESS", "I-EMAIL_ADDRESS", "B-PERSON", "I-PERSON",
                         "B-PHONE_NUMBER", "I-PHONE_NUMBER"]
    results = md.eval_results()
    assert {"entity_precision", "entity_recall", "entity_f1", "accuracy", "f1"} <= set(results["metrics"])
    assert results["data"]["train"][1].endswith("presidio.json")
    assert results["data"]["train_windows"] > results["data"]["train_examples"]  # 16-token windows
    assert results["settings"]["stride"] == 4 and results["settings"]["max_length"] == 16
    assert not (out / "checkpoints").exists()
    assert md.onnx_int8_path is None, "an export left from an earlier run would shadow the new weights"


@pytest.mark.slow
def test_evaluate_pii_reports_entity_scores_per_type(pii_model, capsys, tmp_path):
    out, _, presidio = pii_model
    code, stdout, _ = run_cli(capsys, "evaluate", out, "--data", presidio, "--output", tmp_path / "r.json",
                              "--max-length", "16", "--stride", "4")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["task"] == "pii" and report["texts"] == 2 and report["runtime"] == "torch"
    assert report["max_length"] == 16 and report["stride"] == 4
    assert report["per_type"]["PERSON"]["entities"] == 2 and report["per_type"]["PHONE_NUMBER"]["entities"] == 1
    assert report["per_type"]["EMAIL_ADDRESS"] == {"entities": 1, "caught": 1.0}  # the email recognizer
    assert "caught=" in stdout and "entity type" in stdout
    assert not (tmp_path / "confusion_matrix.png").exists()


@pytest.mark.slow
def test_pretrain_writes_a_masked_lm_that_loads(tiny_base, capsys, tmp_path):
    from transformers import AutoModelForMaskedLM

    corpus = corpus_file(tmp_path / "corpus.txt")
    code, stdout, _ = run_cli(capsys, "pretrain", "--base-model", tiny_base, "--corpus", corpus,
                              "--output", tmp_path / "pre", "--max-steps", "2", "--max-length", "32",
                              "--batch-size", "4", "--validation-fraction", "0.2")
    assert code == 0
    results = json.loads((tmp_path / "pre" / "pretrain_results.json").read_text())
    assert results["steps"] == 2 and results["settings"]["mlm_probability"] == 0.3
    assert results["metrics"]["validation_perplexity"] > 1
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "pre").config.vocab_size > 0
    assert not (tmp_path / "pre" / "checkpoints").exists()


def test_base_builds_an_untrained_model_with_its_tokenizer(capsys, tmp_path):
    corpus = corpus_file(tmp_path / "corpus.txt")
    code, stdout, _ = run_cli(capsys, "base", "--size", "tiny", "--corpus", corpus, "--output", tmp_path / "b")
    assert code == 0 and "tiny" in stdout
    assert (tmp_path / "b" / "tokenizer.json").is_file() and (tmp_path / "b" / "model.safetensors").is_file()


def test_base_with_a_missing_corpus_is_one_error_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "base", "--size", "tiny", "--corpus", tmp_path / "none.txt", "--output", tmp_path / "b")
    assert code == 2 and err.strip() == f"error: {tmp_path}/none.txt: no such file"


def test_synth_pii_writes_span_rows_the_pii_loader_accepts(capsys, tmp_path):
    from trainer.data import load_spans

    code, stdout, _ = run_cli(capsys, "synth-pii", "--count", "25", "--seed", "3", "--output", tmp_path / "s.jsonl")
    rows = load_spans(tmp_path / "s.jsonl")
    assert code == 0 and len(rows) == 25 and any(r.spans for r in rows)


def test_unloadable_base_model_is_one_error_line(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", category_rows(5))
    code, _, err = run_cli(capsys, "category", "--train", train, "--base-model", tmp_path / "no-model",
                           "--output", tmp_path / "m")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: {tmp_path}/no-model: cannot load the base model")
    assert "Traceback" not in err


def test_export_errors_are_one_line(tiny_category_dir, capsys, tmp_path):
    copy = shutil.copytree(tiny_category_dir, tmp_path / "m")
    code, _, err = run_cli(capsys, "export", copy, "--tolerance", "-1")
    assert code == 2 and err.strip() == "error: tolerance must be a finite number >= 0, got -1.0"
    code, _, err = run_cli(capsys, "export", tmp_path / "missing")
    assert code == 2 and "no such model directory" in err


def test_calibration_data_without_int8_is_refused_before_training(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", category_rows(2))
    code, _, err = run_cli(capsys, "category", "--train", train, "--output", tmp_path / "out",
                           "--int8-calibration", train)
    assert code == 2 and "--int8-calibration sets static INT8 ranges: it needs --int8" in err
    assert not (tmp_path / "out").exists()
