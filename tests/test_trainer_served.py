"""`trainer.served`: scores of a model directory through the sidecar's own decision code.

The fixtures are untrained, so their predictions are noise; the PII tests lean on what is exact: the
pattern recognizers run beside the model (emails, SSNs, IP addresses are found whatever the model says),
and a policy whose score threshold only the recognizers reach (`RECOGNIZERS_ONLY`) keeps the model's
random spans out of the counts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sidecar.config import PiiPolicyConfig
from tests.factories import category_rows, write_jsonl
from tests.inference_fakes import onnx_copy
from tests.trainer_helpers import SPAN_ROWS, run_cli
from trainer.served import decide, evaluate_served, score_category, score_clean, score_pii, served_router
from trainer.settings import UsageError

# The untrained model's spans score 0.5-0.6; the email recognizer scores 1.0, the SSN one 0.85.
RECOGNIZERS_ONLY = PiiPolicyConfig(score_threshold=0.8)


def span(text: str, value: str, label: str, extra: int = 0) -> dict:
    start = text.index(value)
    return {"start": start, "end": start + len(value) + extra, "label": label}


@pytest.fixture(scope="module")
def pii_router(tiny_pii_dir):
    with served_router(pii=tiny_pii_dir) as router:
        yield router


@pytest.fixture(scope="module")
def strict_pii_router(tiny_pii_dir):
    with served_router(pii=tiny_pii_dir, policy=RECOGNIZERS_ONLY) as router:
        yield router


@pytest.fixture(scope="module")
def onnx_only_category(tiny_category_dir, tmp_path_factory) -> Path:
    """The category fixture as a directory with ONNX weights only, trained (it says) at 64 tokens."""
    exported = onnx_copy(tiny_category_dir, tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("onnx_only") / "category"
    out.mkdir()
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(exported / name, out / name)
    config = json.loads((exported / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "sidecar_max_length": 64}))
    return out


# --- PII ---------------------------------------------------------------------------------------------


def test_emails_and_ssns_the_patterns_find_are_caught_with_their_type_and_context_types_are_not_counted(pii_router):
    email = "Write to ana.lopez@example.org about it."
    ssn = "My SSN is 123-45-6789, thanks."
    place = "We met in Paris last spring."
    rows = [{"text": email, "spans": [span(email, "ana.lopez@example.org", "EMAIL_ADDRESS")]},
            {"text": ssn, "spans": [span(ssn, "123-45-6789", "US_SSN")]},
            {"text": place, "spans": [span(place, "Paris", "LOCATION")]}]
    report = score_pii(pii_router, rows)
    assert report["texts"] == 3 and report["entities"] == 2
    assert report["caught"] == 1.0 and report["type_right"] == 1.0
    assert report["per_type"] == {"EMAIL_ADDRESS": {"entities": 1, "caught": 1.0}, "US_SSN": {"entities": 1, "caught": 1.0}}
    assert "same_spans_alone" not in report


def test_missed_names_wrong_types_and_unlabelled_masks_are_counted(strict_pii_router):
    email = "Write to ana.lopez@example.org about it."
    person = "Please ask Margaret Campbell in Paris."
    stray = "Nothing here but bob@example.com slipped in."
    mislabelled = "Mail carol@example.net now."
    rows = [
        # the gold span takes the space after the address: only non-space characters must be masked
        {"text": email, "spans": [span(email, "ana.lopez@example.org", "EMAIL_ADDRESS", extra=1)]},
        {"text": person, "spans": [span(person, "Margaret Campbell", "PERSON"), span(person, "Paris", "LOCATION")]},
        {"text": stray, "spans": []},
        {"text": mislabelled, "spans": [span(mislabelled, "carol@example.net", "PERSON")]},
    ]
    report = score_pii(strict_pii_router, rows)
    assert report["entities"] == 3
    assert report["caught"] == round(2 / 3, 4)  # the email and the mislabelled email; the name is missed
    assert report["type_right"] == 0.5  # the mislabelled one is masked as EMAIL_ADDRESS
    assert report["per_type"] == {"PERSON": {"entities": 2, "caught": 0.5}, "EMAIL_ADDRESS": {"entities": 1, "caught": 1.0}}
    assert report["texts_with_false_mask"] == 0.25
    letters = lambda value: sum(c.isalnum() for c in value)  # noqa: E731 - punctuation under a mask hides nothing
    masked = letters("ana.lopez@example.org") + letters("bob@example.com") + letters("carol@example.net")
    assert report["false_mask_char_share"] == round(letters("bob@example.com") / masked, 4)


def test_same_spans_alone_compares_the_inner_sentence_with_its_place_in_the_long_text(strict_pii_router):
    sentence = "Write to ana.lopez@example.org today."
    text = "Some preamble about the weather. " + sentence + " And a closing line."
    start = text.index(sentence)
    cut = text.index(".org") + 3  # alone, "…@example.or" is a different address than the full one
    rows = [{"text": text, "spans": [span(text, "ana.lopez@example.org", "EMAIL_ADDRESS")],
             "inner": [start, start + len(sentence)]},
            {"text": text, "spans": [span(text, "ana.lopez@example.org", "EMAIL_ADDRESS")], "inner": [start, cut]}]
    [full, _, alone] = decide(strict_pii_router, [text, text[start:start + len(sentence)], text[start:cut]])
    assert [s["label"] for s in full.pii] == ["EMAIL_ADDRESS"] and alone.pii[0]["end"] == cut - start
    report = score_pii(strict_pii_router, rows)
    assert report["texts"] == 2 and report["entities"] == 2 and report["caught"] == 1.0
    assert report["inner_texts"] == 2 and report["same_spans_alone"] == 0.5


def test_clean_texts_report_how_often_and_with_what_anything_is_masked(strict_pii_router):
    texts = ["What is the integral of 3x from 0 to 2?", "Mail bob@example.com the notes.",
             "The server at 10.20.30.40 is down.", "Cells make ATP in mitochondria."]
    report = score_clean(strict_pii_router, texts)
    assert report == {"texts": 4, "with_any_mask": 0.5, "with_person_contact_or_number_mask": 0.5,
                      "by_label": {"EMAIL_ADDRESS": 1, "IP_ADDRESS": 1}}


def test_pii_directory_is_evaluated_at_the_window_asked_for_on_span_files(tiny_pii_dir, tmp_path):
    data = write_jsonl(tmp_path / "spans.jsonl", SPAN_ROWS)
    report = evaluate_served(tiny_pii_dir, [str(data)], max_length=32, stride=8)
    assert report["task"] == "pii" and report["runtime"] == "torch" and report["file"] == "model.safetensors"
    assert report["max_length"] == 32 and report["stride"] == 8 and report["texts"] == 4
    assert {k: v["entities"] for k, v in report["per_type"].items()} == {"PERSON": 3, "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1}
    assert report["per_type"]["EMAIL_ADDRESS"]["caught"] == 1.0  # the email recognizer, in both scripts


def test_entity_bias_is_served_as_configured_and_a_bad_one_is_one_error_line(tiny_pii_dir, capsys, tmp_path):
    data = write_jsonl(tmp_path / "spans.jsonl", SPAN_ROWS)
    report = evaluate_served(tiny_pii_dir, [str(data)], entity_bias={"PERSON": 20.0})
    assert report["entity_bias"] == {"PERSON": 20.0}
    assert report["per_type"]["PERSON"]["caught"] == 1.0  # every token is a name now
    for bad, says in (("PERSON", "expected TYPE=NUMBER"), ("PERSON=lots", "expected TYPE=NUMBER"),
                      ("PERSON=99", "less than or equal to 20"), ("PERSONA=1", "PERSONA, which the model does not tag")):
        capsys.readouterr()
        code, _, err = run_cli(capsys, "evaluate", tiny_pii_dir, "--data", data, "--entity-bias", bad)
        last = err.strip().splitlines()[-1]  # before it, at most the model's load logs
        assert code == 2 and last.startswith("error: ") and says in last, (bad, err)


def test_window_settings_the_sidecar_would_refuse_are_a_usage_error(tiny_pii_dir):
    with pytest.raises(UsageError, match="stride must be smaller than max_length - 2"), \
            served_router(pii=tiny_pii_dir, max_length=16, stride=64):
        pass


# --- category ----------------------------------------------------------------------------------------


def test_category_accuracy_coverage_and_confusion_follow_the_served_decisions(tiny_category_dir):
    texts = ["Which organelle makes ATP?", "Solve 3x + 5 = 11.", "Is the contract void?", "What does gene X encode?"]
    with served_router(category=tiny_category_dir) as router:
        decisions = decide(router, texts)
        predicted = [d.category for d in decisions]
        wrong = next(label for label in ("biology", "law", "math") if label != predicted[3])
        rows = [{"text": t, "label": p} for t, p in zip(texts[:3], predicted, strict=False)]
        rows.append({"text": texts[3], "label": wrong})
        middle = sorted(d.confidence for d in decisions)[2]
        report = score_category(router, rows, thresholds=(0.0, middle, 1.0))
    assert report["examples"] == 4 and report["accuracy"] == 0.75
    assert report["coverage"][0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.75}
    expected = [ok for ok, d in zip([True, True, True, False], decisions, strict=True) if d.confidence >= middle]
    assert report["coverage"][1] == {"threshold": middle, "coverage": 0.5, "accuracy": sum(expected) / 2}
    assert report["coverage"][2]["accuracy"] is None  # nothing is that confident
    routed = [d.confidence >= 0.5 for d in decisions]
    assert report["at_routing_threshold"]["threshold"] == 0.5
    assert report["at_routing_threshold"]["coverage"] == sum(routed) / 4
    matrix = report["confusion_matrix"]["matrix"]
    assert report["confusion_matrix"]["labels"] == ["biology", "law", "math"]
    assert sum(map(sum, matrix)) == 4 and sum(matrix[i][i] for i in range(3)) == 3
    assert sum(row["support"] for row in report["per_class"].values()) == 4
    assert 0.0 < report["f1_weighted"] <= 1.0


def test_onnx_only_directory_is_evaluated_through_the_cli_on_onnx(onnx_only_category, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", category_rows(3))
    code, stdout, _ = run_cli(capsys, "evaluate", onnx_only_category, "--data", data, "--output", tmp_path / "r.json")
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"] == "category" and report["runtime"] == "onnx" and report["file"] == "model.onnx"
    assert report["max_length"] == 64  # the window the directory says it was trained at
    assert report["examples"] == 9 and sum(map(sum, report["confusion_matrix"]["matrix"])) == 9
    assert [c["threshold"] for c in report["coverage"]] == [0.0, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert report["coverage"][0]["coverage"] == 1.0 and report["coverage"][0]["accuracy"] == report["accuracy"]
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "runtime=onnx" in stdout and "biology" in stdout and "<- routing threshold" in stdout


def test_auto_runtime_serves_the_int8_file_when_there_is_one(onnx_only_category, capsys, tmp_path):
    directory = shutil.copytree(onnx_only_category, tmp_path / "m")
    shutil.copy(directory / "model.onnx", directory / "model.int8.onnx")  # any valid graph: this checks the choice
    data = write_jsonl(tmp_path / "d.jsonl", category_rows(1))
    code, _, _ = run_cli(capsys, "evaluate", directory, "--data", data, "--output", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["runtime"] == "onnx-int8" and report["file"] == "model.int8.onnx"


def test_a_runtime_the_directory_cannot_serve_is_one_error_line(onnx_only_category, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", category_rows(1))
    code, _, err = run_cli(capsys, "evaluate", onnx_only_category, "--data", data, "--runtime", "torch")
    assert code == 2 and err.startswith("error: ") and "needs PyTorch weights" in err and len(err.splitlines()) == 1


def test_unknown_category_labels_fail_unless_dropped(onnx_only_category, tmp_path):
    from trainer.data import DataError

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "q one", "label": "law"}, {"text": "q two", "label": "poetry"}])
    with pytest.raises(DataError, match="unknown label 'poetry'"):
        evaluate_served(onnx_only_category, [str(data)])
    report = evaluate_served(onnx_only_category, [str(data)], drop_unknown_labels=True)
    assert report["examples"] == 1 and report["dropped_unknown_labels"] == 1
