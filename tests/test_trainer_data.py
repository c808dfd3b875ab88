"""Loaders for every format, the validation split, and one clear line for every kind of bad input."""

import json

import pytest

from tests.factories import category_rows, write_jsonl
from tests.trainer_helpers import PRESIDIO_ROWS, SPAN_ROWS, run_cli, write_presidio
from trainer.data import (
    DataError,
    EntitySpan,
    load_category,
    load_spans,
    load_task_data,
    sample,
    split_validation,
)

# --- loaders ---------------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b", "label": "x"}\n\n{"text": "c d", "label": "y"}\n')
    rows = load_category(path)
    assert [(r.text, r.label, r.row) for r in rows] == [("a b", "x", 1), ("c d", "y", 3)]


def test_csv_with_configured_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,category\n"What is 2+2, really?",math\nWho wrote Hamlet?,history\n')
    rows = load_category(path, text_column="question", label_column="category")
    assert [(r.text, r.label, r.row) for r in rows] == [("What is 2+2, really?", "math", 2), ("Who wrote Hamlet?", "history", 3)]


def test_parquet_and_saved_datasets_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "q one", "category": "law"}, {"question": "q two", "category": "math"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))

    from_parquet = load_category(tmp_path / "d.parquet", "question", "category")
    from_disk = load_category(tmp_path / "saved", "question", "category", split="test")
    assert [(r.text, r.label) for r in from_parquet] == [("q one", "law"), ("q two", "math")]
    assert [(r.text, r.label) for r in from_disk] == [("q one", "law")]


def test_saved_dataset_with_a_missing_split_lists_the_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a", "label": "b"}])}).save_to_disk(
        str(tmp_path / "saved")
    )
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train\)"):
        load_category(tmp_path / "saved", split="validation")


def test_span_jsonl_rows_come_back_sorted(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", SPAN_ROWS)
    rows = load_spans(path)
    assert rows[0].spans == (EntitySpan(6, 16, "PERSON"), EntitySpan(20, 42, "EMAIL_ADDRESS"))
    assert rows[2].text[5:7] == "张伟" and rows[3].spans == ()


def test_presidio_json_array_is_detected_and_spans_sorted(tmp_path):
    rows = load_spans(write_presidio(tmp_path / "presidio.json"))
    assert rows[0].spans == (EntitySpan(40, 59, "PERSON"),)
    assert [s.label for s in rows[1].spans] == ["PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER"]
    assert [rows[1].text[s.start:s.end] for s in rows[1].spans] == ["Anna Berg", "anna@example.org", "030 1234567"]


def test_presidio_rows_also_load_from_jsonl(tmp_path):
    rows = load_spans(write_jsonl(tmp_path / "p.jsonl", PRESIDIO_ROWS))
    assert rows[0].spans == (EntitySpan(40, 59, "PERSON"),) and rows[1].row == 2


# --- splits and samples ----------------------------------------------------------------------------


def test_stratified_split_holds_out_every_class(tmp_path):
    rows = load_category(write_jsonl(tmp_path / "d.jsonl", category_rows(10)))
    train, val, how = split_validation(rows, 0.2, seed=1, stratify=True)
    assert how == "stratified split" and len(val) == 6 and len(train) == 24
    assert sorted(r.label for r in val) == ["biology"] * 2 + ["law"] * 2 + ["math"] * 2


def test_split_is_seeded(tmp_path):
    rows = load_category(write_jsonl(tmp_path / "d.jsonl", category_rows(10)))
    assert split_validation(rows, 0.2, 3, True)[1] == split_validation(rows, 0.2, 3, True)[1]
    assert split_validation(rows, 0.2, 3, True)[1] != split_validation(rows, 0.2, 4, True)[1]


def test_a_class_too_small_to_stratify_falls_back_to_a_random_split_with_a_warning(tmp_path):
    from structlog.testing import capture_logs

    rows = load_category(write_jsonl(tmp_path / "d.jsonl", category_rows(10) + [{"text": "lone row", "label": "art"}]))
    with capture_logs() as logs:
        train, val, how = split_validation(rows, 0.2, seed=1, stratify=True)
    assert how == "random split" and len(train) + len(val) == len(rows)
    assert [e["event"] for e in logs] == ["validation_split_not_stratified"]
    assert logs[0]["rare_classes"] == ["art"]


def test_sample_draws_from_the_whole_file_not_its_head(tmp_path):
    sorted_rows = sorted(category_rows(30), key=lambda r: r["label"])
    rows = load_category(write_jsonl(tmp_path / "d.jsonl", sorted_rows))
    picked = sample(rows, 15, seed=0)
    assert len(picked) == 15 and {r.label for r in picked} == {"biology", "law", "math"}
    assert sample(rows, 15, seed=0) == picked


def test_task_data_builds_bio_labels_from_the_training_spans(tmp_path):
    data = load_task_data("pii", [str(write_jsonl(tmp_path / "s.jsonl", SPAN_ROWS))], validation_fraction=0.25)
    assert data.labels == ["O", "B-EMAIL_ADDRESS", "I-EMAIL_ADDRESS", "B-PERSON", "I-PERSON",
                           "B-PHONE_NUMBER", "I-PHONE_NUMBER"]
    assert len(data.train) == 3 and len(data.validation) == 1 and data.validation_from == "random split"


def test_a_type_only_in_the_held_out_split_still_gets_labels(tmp_path):
    rows = [dict(SPAN_ROWS[0])] * 8 + [SPAN_ROWS[1]]  # PHONE_NUMBER appears once
    for seed in range(6):
        data = load_task_data("pii", [str(write_jsonl(tmp_path / "s.jsonl", rows))], validation_fraction=0.2, seed=seed)
        assert "B-PHONE_NUMBER" in data.labels


# --- bad input: one line, file:row: problem, exit status 2 ------------------------------------------


def _category_error(capsys, tmp_path, content: str, *extra: str, name: str = "bad.jsonl") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    code, out, err = run_cli(capsys, "category", "--train", path, "--output", tmp_path / "m", *extra)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.strip().replace(str(tmp_path) + "/", "")


def _pii_error(capsys, tmp_path, rows: list[dict]) -> str:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, out, err = run_cli(capsys, "pii", "--train", path, "--output", tmp_path / "m")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.strip().replace(str(tmp_path) + "/", "")


def test_empty_file(capsys, tmp_path):
    assert _category_error(capsys, tmp_path, "\n\n") == "error: bad.jsonl: empty file: no rows"


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "category", "--train", tmp_path / "nope.jsonl", "--output", tmp_path / "m")
    assert code == 2 and err.strip() == f"error: {tmp_path}/nope.jsonl: no such file"


def test_missing_text_column_lists_the_columns_and_the_flag(capsys, tmp_path):
    err = _category_error(capsys, tmp_path, '{"text": "ok", "label": "a"}\n{"question": "q", "label": "b"}\n')
    assert err == "error: bad.jsonl:2: missing column 'text' (columns: question, label); choose another with --text-column"


def test_missing_label_column_in_csv_names_the_spreadsheet_row(capsys, tmp_path):
    err = _category_error(capsys, tmp_path, "text,topic\nhello,a\n", name="bad.csv")
    assert err.startswith("error: bad.csv:2: missing column 'label' (columns: text, topic)")


def test_non_string_text(capsys, tmp_path):
    err = _category_error(capsys, tmp_path, '{"text": 42, "label": "a"}\n')
    assert err == "error: bad.jsonl:1: text column 'text' is int, expected a string"


def test_empty_text(capsys, tmp_path):
    err = _category_error(capsys, tmp_path, '{"text": "ok", "label": "a"}\n{"text": "   ", "label": "a"}\n')
    assert err == "error: bad.jsonl:2: empty text in column 'text'"


def test_invalid_json_line(capsys, tmp_path):
    err = _category_error(capsys, tmp_path, '{"text": "ok", "label": "a"}\n{"text": \n')
    assert err.startswith("error: bad.jsonl:2: not valid JSON")


def test_unknown_label_in_validation_names_the_validation_file_and_row(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", category_rows(3))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "q", "label": "law"}, {"text": "q", "label": "poetry"}])
    code, _, err = run_cli(capsys, "category", "--train", train, "--validation", val, "--output", tmp_path / "m")
    assert code == 2
    assert err.strip() == f"error: {val}:2: unknown label 'poetry' (not in the training labels: biology, law, math)"


def test_single_label_training_data(capsys, tmp_path):
    err = _category_error(capsys, tmp_path, '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n',
                          "--validation-fraction", "0.5")
    assert err.endswith("only one label (x); a classifier needs at least two")


def test_span_out_of_range(capsys, tmp_path):
    err = _pii_error(capsys, tmp_path, [{"text": "short", "spans": [{"start": 2, "end": 9, "label": "PERSON"}]}])
    assert err == "error: bad.jsonl:1: span 1 (PERSON) [2, 9) is out of range for a text of 5 characters"


def test_inverted_span(capsys, tmp_path):
    err = _pii_error(capsys, tmp_path, [{"text": "John Smith", "spans": [{"start": 5, "end": 2, "label": "PERSON"}]}])
    assert err == "error: bad.jsonl:1: span 1 (PERSON) [5, 2) is empty or inverted"


def test_overlapping_spans(capsys, tmp_path):
    rows = [SPAN_ROWS[0], {"text": "John Smith", "spans": [{"start": 0, "end": 10, "label": "PERSON"},
                                                           {"start": 5, "end": 10, "label": "LOCATION"}]}]
    err = _pii_error(capsys, tmp_path, rows)
    assert err == "error: bad.jsonl:2: spans overlap: PERSON [0, 10) and LOCATION [5, 10)"


def test_non_integer_offsets(capsys, tmp_path):
    err = _pii_error(capsys, tmp_path, [{"text": "John Smith", "spans": [{"start": "0", "end": 4, "label": "PERSON"}]}])
    assert err == "error: bad.jsonl:1: span 1 'start' is '0', expected an integer offset"
    err = _pii_error(capsys, tmp_path, [{"text": "John Smith", "spans": [{"start": 0, "end": 4.0, "label": "PERSON"}]}])
    assert err == "error: bad.jsonl:1: span 1 'end' is 4.0, expected an integer offset"


def test_presidio_span_errors_use_presidio_key_names(capsys, tmp_path):
    path = write_presidio(tmp_path / "p.json", [{"full_text": "Anna", "spans": [{"entity_type": "PERSON", "start_position": 0}]}])
    code, _, err = run_cli(capsys, "pii", "--train", path, "--output", tmp_path / "m")
    assert code == 2 and err.strip() == f"error: {path}:1: span 1 has no 'end_position'"


def test_training_data_without_any_span(capsys, tmp_path):
    err = _pii_error(capsys, tmp_path, [{"text": "nothing here", "spans": []}, {"text": "nor here", "spans": []}])
    assert err == "error: " + "bad.jsonl" + ": no entity spans in the training data"


def test_unsupported_file_type(capsys, tmp_path):
    err = _category_error(capsys, tmp_path, "text\n", name="bad.txt")
    assert err.startswith("error: bad.txt: unsupported file type '.txt'")


def test_bad_flag_value_names_the_flag(capsys, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", category_rows(3))
    code, _, err = run_cli(capsys, "category", "--train", train, "--output", tmp_path / "m", "--warmup-ratio", "2")
    assert code == 2 and err.splitlines()[-1] == "error: --warmup-ratio must be in [0, 1), got 2.0"


def test_error_row_for_a_presidio_array_is_the_record_number(tmp_path):
    rows = json.loads(json.dumps(PRESIDIO_ROWS))
    rows[1]["spans"][0]["end_position"] = 500
    with pytest.raises(DataError) as e:
        load_spans(write_presidio(tmp_path / "p.json", rows))
    assert (e.value.row, e.value.file) == (2, str(tmp_path / "p.json"))
