"""`trainer synth-pii`: deterministic rows whose spans cut exactly the inserted values."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest

from trainer import synth

ROWS = 3000


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return synth.generate(ROWS, seed=11)


def _spans(rows: list[dict], label: str) -> list[str]:
    return [r["text"][s["start"]:s["end"]] for r in rows for s in r["spans"] if s["label"] == label]


def _luhn_ok(number: str) -> bool:
    digits = [int(d) for d in re.sub(r"[ -]", "", number)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(value: str) -> bool:
    s = value.replace(" ", "").upper()
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def test_same_seed_gives_identical_rows():
    assert synth.generate(200, seed=5) == synth.generate(200, seed=5)


def test_same_seed_gives_identical_rows_in_processes_that_hash_strings_differently():
    """Faker's it_IT cities come from a set, whose order follows each process's string hashing."""
    import os
    import subprocess
    import sys

    code = "import json; from trainer import synth; print(json.dumps(synth.generate(60, seed=1)))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outs) == 1 and len(json.loads(outs.pop())) == 60


def test_different_seeds_give_different_rows():
    assert synth.generate(50, seed=5) != synth.generate(50, seed=6)


def test_generation_leaves_global_random_state_alone():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    synth.generate(20, seed=1)
    assert random.random() == expected


def test_rows_have_the_span_format_with_sorted_disjoint_spans(rows):
    assert len(rows) == ROWS
    for row in rows:
        assert set(row) == {"text", "spans"}
        assert isinstance(row["text"], str) and row["text"]
        end = 0
        for span in row["spans"]:
            assert set(span) == {"start", "end", "label"}
            assert span["label"] in synth.LABELS
            assert end <= span["start"] < span["end"] <= len(row["text"])
            value = row["text"][span["start"]:span["end"]]
            assert value == value.strip(), f"span has edge whitespace: {value!r}"
            end = span["end"]


def test_span_offsets_cut_exactly_the_inserted_values(rows):
    """Each type's spans parse as that type: an offset one off would break the check or the pattern."""
    emails = _spans(rows, "EMAIL_ADDRESS")
    assert emails and all(re.fullmatch(r"[\w.+-]+@[\w-]+(\.[\w-]+)+", e, re.ASCII) for e in emails)
    ssns = _spans(rows, "US_SSN")
    assert ssns and all(re.fullmatch(r"\d{3}[- ]?\d{2}[- ]?\d{4}", s) for s in ssns)
    cards = _spans(rows, "CREDIT_CARD")
    assert cards and all(re.fullmatch(r"\d[\d -]{10,21}\d", c) and _luhn_ok(c) for c in cards)
    ibans = _spans(rows, "IBAN_CODE")
    assert ibans and all(_iban_ok(i) for i in ibans)
    ips = _spans(rows, "IP_ADDRESS")
    assert ips and all(ipaddress.ip_address(ip) for ip in ips)
    phones = _spans(rows, "PHONE_NUMBER")
    assert phones and all(re.fullmatch(r"[+(\d][\d ()./x-]*\d", p, re.I) for p in phones)


def test_every_label_appears(rows):
    seen = {s["label"] for r in rows for s in r["spans"]}
    assert seen == set(synth.LABELS)


def test_values_come_from_several_locales_and_formats(rows):
    assert {i.replace(" ", "")[:2].upper() for i in _spans(rows, "IBAN_CODE")} >= {"DE", "FR", "ES", "IT", "NL", "GB"}
    cards = _spans(rows, "CREDIT_CARD")
    assert any(" " in c for c in cards) and any("-" in c for c in cards) and any(c.isdigit() for c in cards)
    assert {len(re.sub(r"\D", "", c)) for c in cards} >= {14, 15, 16}
    ips = [ipaddress.ip_address(ip) for ip in _spans(rows, "IP_ADDRESS")]
    assert {ip.version for ip in ips} == {4, 6}
    phones = _spans(rows, "PHONE_NUMBER")
    assert any(p.startswith("+") for p in phones) and any(not p.startswith(("+", "00")) for p in phones)
    dates = _spans(rows, "DATE_TIME")
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d", d) for d in dates)
    assert any(re.search(r"[A-Za-z]", d) for d in dates)


def test_rows_include_multibyte_text_with_exact_offsets(rows):
    cjk = [r for r in rows if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", r["text"])]
    assert len(cjk) > ROWS * 0.02
    cjk_spans = [v for r in cjk for v in _spans([r], "PERSON") if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", v)]
    assert cjk_spans and all(not re.search(r"[，。：、（）]", v) for v in cjk_spans)


def test_rows_include_texts_without_pii_and_unlabelled_hard_negatives(rows):
    empty = [r["text"] for r in rows if not r["spans"]]
    assert ROWS * 0.05 < len(empty) < ROWS * 0.3
    assert sum(bool(re.search(r"\d", t)) for t in empty) > len(empty) / 3
    assert any("ISBN" in t for t in empty) and any(re.search(r"\d+\.\d+\.\d+", t) for t in empty)


def test_casing_varies_between_rows(rows):
    assert any(r["text"].isupper() for r in rows if r["spans"])
    assert any(r["text"].islower() for r in rows if r["spans"])


def test_write_jsonl_round_trips_and_keeps_non_ascii(tmp_path):
    rows = [{"text": "我叫李雪梅", "spans": [{"start": 2, "end": 5, "label": "PERSON"}]}] + synth.generate(10, 3)
    path = synth.write_jsonl(rows, tmp_path / "nested" / "pii.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert "李雪梅" in lines[0]
    assert [json.loads(line) for line in lines] == rows


@pytest.mark.parametrize("count", [-1, 2.5, "10", True])
def test_bad_count_is_a_clear_error(count):
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        synth.generate(count, seed=1)


def test_zero_rows_is_an_empty_list():
    assert synth.generate(0, seed=1) == []


def test_iter_rows_checks_its_arguments_before_iterating():
    with pytest.raises(ValueError, match="seed must be an integer"):
        synth.iter_rows(5, seed="abc")
