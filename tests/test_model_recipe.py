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


def test_rescore_replaces_what_it_measures_and_keeps_what_needs_unshipped_files(tmp_path, monkeypatch):
    import json

    from models import build

    def served_pii(caught):
        clean = {"texts": 10, "with_any_mask": 0.0, "with_person_contact_or_number_mask": 0.0, "by_label": {}}
        sets = {k: {"caught": caught, "type_right": 1.0, "same_spans_alone": 1.0, "per_type": {}}
                for k in ("presidio_held_out_templates", "any_position_1_8kb", "wnut17_real_text")}
        return sets | {k: clean for k in ("exam_questions_name_free", "wnut17_entity_free", "everyday_questions")}

    def served_category(accuracy):
        at = {"threshold": 0.5, "coverage": 0.8, "accuracy": accuracy}
        return {k: {"accuracy": accuracy, "at_routing_threshold": at} for k in ("exam", "everyday")}

    both = {k: {"accuracy": 0.7} for k in ("exam", "everyday")}
    old_pii = {"task": "pii", "cost_200_token_request": {"ratio": 1.0}, "notes": ["old"],
               "served": served_pii(0.5), "baseline_recognizers_only": served_pii(0.1)}
    old_category = {"task": "category", "fp32": both, "baseline": both, "teacher_not_served": both,
                    "served": served_category(0.6), "notes": ["old"]}
    for name, results in (("pii", old_pii), ("category", old_category)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_results.json").write_text(json.dumps(results))
    monkeypatch.setattr(build, "pii_report", lambda d, p: {"served": served_pii(0.9),
                                                           "baseline_recognizers_only": served_pii(0.1)})
    monkeypatch.setattr(build, "category_report", lambda *a, **k: {"served": served_category(0.8), "fp32": "re-measured"})

    build.rescore(tmp_path, {})

    pii = json.loads((tmp_path / "pii" / "eval_results.json").read_text())
    category = json.loads((tmp_path / "category" / "eval_results.json").read_text())
    assert pii["served"]["presidio_held_out_templates"]["caught"] == 0.9
    assert pii["cost_200_token_request"] == {"ratio": 1.0} and pii["task"] == "pii"
    assert pii["notes"][0] == build.BUILT_NOTE and "90.0%" in pii["notes"][1]
    assert category["served"]["exam"]["accuracy"] == 0.8
    assert category["fp32"] == both and category["teacher_not_served"] == both  # fp32 weights are not shipped
    assert "80.0%" in category["notes"][1] and (tmp_path / "category" / "README.md").is_file()
