"""The bundled models' data recipe (models/datasets.py): held out by template, PII placed at any offset."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.datasets import chat_style, in_context, looks_name_free, presidio_split  # noqa: E402


def test_presidio_rows_are_held_out_by_whole_template_never_by_row():
    rows = [{"full_text": f"t{i}", "spans": [], "template_id": i % 20} for i in range(200)]
    train, held = presidio_split(rows, share=0.15, seed=3)
    assert len(train) + len(held) == 200 and held
    assert {r["template_id"] for r in train}.isdisjoint({r["template_id"] for r in held})


def test_pii_set_inside_prose_keeps_its_spans_on_the_same_characters():
    row = {"text": "Mail Jane Roe at jane@example.org.", "spans": [{"start": 5, "end": 13, "label": "PERSON"},
                                                                 {"start": 17, "end": 33, "label": "EMAIL_ADDRESS"}]}
    pool = ["What is the boiling point of water at sea level?", "Explain the causes of inflation."]
    rng = random.Random(0)
    for before, after in ((0, 0), (40, 0), (300, 120), (2000, 900)):
        out = in_context(row, pool, before, after, rng)
        start, end = out["inner"]
        assert out["text"][start:end] == row["text"]
        assert [out["text"][s["start"]:s["end"]] for s in out["spans"]] == ["Jane Roe", "jane@example.org"]


def test_chat_style_cuts_drop_the_answer_frame_and_keep_the_subject():
    rng = random.Random(1)
    exam = "Photosynthesis occurs in which organelle? Which of the following is correct? A) nucleus B) chloroplast"
    for _ in range(20):
        cut = chat_style(exam, rng)
        assert cut and "following" not in cut.lower() and "chloroplast" not in cut
        assert "photosynthesis" in cut.lower()


def test_exam_questions_that_name_someone_are_not_used_as_pii_free_negatives():
    names = {"Zoey", "Max"}
    assert not looks_name_free("A patio is built. Then Zoey is laying bricks for it.", names)
    assert looks_name_free("What is the derivative of x squared?", names)
