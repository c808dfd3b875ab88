"""The bundled models' data recipe (models/datasets.py): held out by template, PII placed at any offset."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from models import datasets  # noqa: E402
from models.datasets import (  # noqa: E402
    chat_style,
    in_context,
    looks_name_free,
    presidio_split,
    subject_terms,
    term_questions,
)


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


def _exam(label: str, words: str, n: int) -> list[dict]:
    return [{"text": f"Question {i}: which of the following about {words} is correct? ({i})", "label": label}
            for i in range(n)]


def test_subject_terms_keep_words_one_label_owns_and_drop_shared_and_exam_words():
    rows = _exam("chemistry", "polymer chains", 6) + _exam("math", "median values", 6) + _exam("physics", "chains", 6)
    terms = subject_terms(rows, min_rows=5, purity=0.8)
    assert "polymer" in terms["chemistry"] and "median" in terms["math"]
    assert "chains" not in terms["chemistry"]  # half its rows are physics
    assert not any(w in t for ts in terms.values() for t in ts for w in ("following", "correct", "question"))


def test_a_passage_shared_by_several_questions_counts_as_one_row():
    passage = "This question refers to the following information. The Magna Carta limited the king. " * 3
    rows = [{"text": f"{passage} Question {i}?", "label": "history"} for i in range(6)]
    assert subject_terms(rows, min_rows=2) == {}


def test_term_questions_are_short_everyday_asks_with_the_terms_label():
    rows = _exam("chemistry", "polymer chains", 6) + _exam("math", "median values", 6)
    out = term_questions(rows, per_label=10, rng=random.Random(0))
    assert {r["label"] for r in out} == {"chemistry", "math"}
    for r in out:
        assert len(r["text"].split()) <= 14 and "following" not in r["text"]
        own = {"chemistry": ("polymer", "chains"), "math": ("median", "values")}[r["label"]]
        assert any(w in r["text"].lower() for w in own)


def test_exam_questions_that_name_someone_are_not_used_as_pii_free_negatives():
    names = {"Zoey", "Max"}
    assert not looks_name_free("A patio is built. Then Zoey is laying bricks for it.", names)
    assert not looks_name_free("Zoey has 8 buckets.", names)  # a name that starts the text
    assert not looks_name_free("Testimony:\nMax Weber said", names)  # or a line
    assert looks_name_free("What is the derivative of x squared?", names)
    assert looks_name_free("Maximum load? Zoeys are not a thing.", names)  # a name inside a longer word is not one


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
               "served": served_pii(0.5), "baseline_recognizers_only": served_pii(0.1),
               "teacher_not_served": served_pii(0.95)}  # its teacher is not in the work folder
    old_category = {"task": "category", "fp32": both, "baseline": both, "teacher_not_served": both,
                    "served": served_category(0.6), "notes": ["old"]}
    for name, results in (("pii", old_pii), ("category", old_category)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_results.json").write_text(json.dumps(results))
    monkeypatch.setattr(build, "pii_report", lambda d, p, teacher: {"served": served_pii(0.9),
                                                                    "baseline_recognizers_only": served_pii(0.1)})
    monkeypatch.setattr(build, "category_report", lambda *a, **k: {"served": served_category(0.8), "fp32": "re-measured"})

    build.rescore(tmp_path, tmp_path / "work", {})

    pii = json.loads((tmp_path / "pii" / "eval_results.json").read_text())
    category = json.loads((tmp_path / "category" / "eval_results.json").read_text())
    assert pii["served"]["presidio_held_out_templates"]["caught"] == 0.9
    assert pii["cost_200_token_request"] == {"ratio": 1.0} and pii["task"] == "pii"
    assert "teacher_not_served" not in pii  # scored under the old serving code, with nothing to score it again
    assert pii["notes"][0] == "old" and "90.0%" in pii["notes"][1]  # how it was built stays first
    assert category["served"]["exam"]["accuracy"] == 0.8
    assert category["fp32"] == both and category["teacher_not_served"] == both  # fp32 weights are not shipped
    assert "80.0%" in category["notes"][1] and (tmp_path / "category" / "README.md").is_file()


def test_a_question_asking_what_a_held_out_one_asks_counts_as_held_out():
    held = datasets.HeldOut(["why do cells need mitochondria", "What is confirmation bias?", "how does DNS work",
                             "what is a polymer", "Why did the Tacoma Narrows Bridge collapse in 1940?"])
    for same in ("why do cells even need mitochondria", "what is confirmation bias", "WHAT IS CONFIRMATION BIAS??",
                 "why did the tacoma narrows bridge fall down in 1940", "explain confirmation bias simply"):
        assert same in held, same
    for other in ("how does insulin work", "what is a prion", "why do cells divide", "what is survivorship bias?",
                  "", "???", None):
        assert other not in held, other


def test_category_training_and_checkpoint_rows_hold_no_held_out_question(tmp_path, monkeypatch):
    import json

    labels = ["biology", "physics"]
    exam = [{"text": f"Which of the following is true of {w} number {i}?", "label": labels[i % 2]}
            for i, w in enumerate(["cells", "waves"] * 30)]
    exam += [{"text": "Why do cells need mitochondria?", "label": "biology"}] * 2
    for name in ("mmlu_pro", "mmlu"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in exam))
    everyday = [{"text": t, "label": labels[i % 2]} for i, t in enumerate(
        ["why do cells even need mitochondria", "why is the sky blue?"] + [f"question {i} about waves" for i in range(40)])]
    evals = [{"text": "Why do cells need mitochondria?", "label": "biology"},
             {"text": "Why is the sky blue", "label": "physics"}]
    for path, rows in (("train.jsonl", everyday), ("eval.jsonl", evals)):
        (tmp_path / path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(datasets, "EVERYDAY_TRAIN", tmp_path / "train.jsonl")
    monkeypatch.setattr(datasets, "EVERYDAY_EVAL", tmp_path / "eval.jsonl")
    train, dev, _, terms = datasets.category_rows(tmp_path, term_rows=20)
    held = datasets.HeldOut([r["text"] for r in evals])
    assert train and dev and not [r["text"] for r in train + dev + terms if r["text"] in held]
    assert any(r["text"] == "question 3 about waves" for r in train + dev)


def test_more_training_rows_move_no_held_out_pii_set(tmp_path):
    import json

    from models.datasets import pii_rows

    (tmp_path / "presidio").mkdir()
    (tmp_path / "wnut17").mkdir()
    presidio = [{"full_text": f"Call Ann Lee at 555-01{i:02d}.", "template_id": i % 10,
                 "spans": [{"entity_type": "PERSON", "entity_value": "Ann Lee", "start_position": 5, "end_position": 12}]}
                for i in range(40)]
    (tmp_path / "presidio" / "generated_large.json").write_text(json.dumps(presidio))
    wnut = [{"text": f"sunny day number {i} at the beach", "spans": []} for i in range(30)]
    (tmp_path / "wnut17" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wnut))
    exam = [{"text": f"What is the boiling point of liquid {i} at sea level?", "label": "chemistry"} for i in range(50)]
    val = [{"text": f"Explain why the sky looks blue on day {i}.", "label": "physics"} for i in range(20)]
    few, more = (pii_rows(tmp_path, [], [], rows, val) for rows in (exam, exam + exam[:17]))
    for held in ("presidio_val", "wnut_val", "any_position_val", "clean_val", "wnut_clean_val"):
        assert few[held] == more[held], held
    assert few["context_train"] != more["context_train"]


def test_everyday_questions_that_name_someone_are_not_scored_as_pii_free(tmp_path):
    import json

    from models.build import everyday_texts

    rows = [json.loads(line) for line in datasets.EVERYDAY_EVAL.read_text(encoding="utf-8").splitlines()]
    assert all(isinstance(r["person"], bool) for r in rows)  # every row says, so none is counted by default
    named = {r["text"] for r in rows if r["person"]}
    assert "who was Napoleon and why is he so famous" in named and "What are Newton's three laws of motion?" in named
    assert "What is a KPI and how do managers pick them?" not in named
    path = tmp_path / "everyday.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    free = everyday_texts(path, person=False)
    assert len(free) + len(everyday_texts(path, person=True)) == len(rows) and not named & set(free)
    path.write_text(json.dumps({"text": "an old row", "label": "other"}) + "\n")
    with pytest.raises(KeyError):
        everyday_texts(path, person=False)


def test_ship_records_checkout_paths_not_this_machines(tmp_path):
    import json

    from models import build

    inside = str(build.ROOT / "build" / "models" / "data" / "synth_train.jsonl")
    built = tmp_path / "built"
    built.mkdir()
    (built / "eval_results.json").write_text(json.dumps({
        "task": "pii", "base_model": str(build.ROOT / "build" / "models" / "encoder"),
        "data": {"train": [inside, "/elsewhere/extra.jsonl"], "validation": []},
        "export": {"int8_calibration": {"texts": 3, "sources": [inside]}}}))
    build.ship(built, tmp_path / "shipped", {}, "note")
    results = json.loads((tmp_path / "shipped" / "eval_results.json").read_text())
    assert results["base_model"] == "build/models/encoder"
    assert results["data"]["train"] == ["build/models/data/synth_train.jsonl", "/elsewhere/extra.jsonl"]
    assert results["export"]["int8_calibration"]["sources"] == ["build/models/data/synth_train.jsonl"]


def test_the_cost_yardstick_is_a_fixed_pair_from_git_not_whatever_this_machine_shipped_last(tmp_path, monkeypatch):
    from models import build

    monkeypatch.setattr(build, "COST_YARDSTICK", "HEAD")  # every clone has it; the recipe names #13's pair
    out = tmp_path / "out"
    (out / "pii").mkdir(parents=True)
    (out / "pii" / "model.int8.onnx").write_bytes(b"what this machine built last")
    replaced = build.cost_yardstick(tmp_path / "w", out)
    for task in ("category", "pii"):
        committed = subprocess.run(["git", "-C", str(build.ROOT), "show", f"HEAD:models/{task}/config.json"],
                                   capture_output=True, text=True, check=True).stdout
        assert (replaced / task / "config.json").read_text() == committed
        assert (replaced / task / "model.int8.onnx").stat().st_size > 1_000_000
    assert "commit HEAD" in (replaced / "FROM").read_text() and not (tmp_path / "w" / "replaced.partial").exists()
    (out / "pii" / "model.int8.onnx").write_bytes(b"changed")
    assert build.cost_yardstick(tmp_path / "w", out) == replaced  # built once


def test_outside_git_the_cost_yardstick_is_the_pair_the_build_replaces(tmp_path, monkeypatch):
    from models import build

    monkeypatch.setattr(build, "COST_YARDSTICK", "0" * 40)  # no such commit
    out = tmp_path / "out"
    (out / "pii").mkdir(parents=True)
    (out / "pii" / "model.int8.onnx").write_bytes(b"before")
    replaced = build.cost_yardstick(tmp_path / "w", out)
    assert (replaced / "pii" / "model.int8.onnx").read_bytes() == b"before"
    assert (replaced / "FROM").read_text().strip() == "the bundled models this build replaces"
    assert not build.cost_yardstick(tmp_path / "w2", tmp_path / "nothing-shipped").exists()


def test_a_pii_pass_is_reused_only_when_it_was_trained_from_the_expected_base(tmp_path):
    import json

    from models import build

    encoder, first, done = tmp_path / "encoder", tmp_path / "pii-first", tmp_path / "pii"
    done.mkdir()
    (done / "eval_results.json").write_text(json.dumps({"base_model": str(encoder)}))
    assert not build._built_from(done, encoder)  # not exported: unfinished
    (done / "model.int8.onnx").write_bytes(b"onnx")
    assert build._built_from(done, encoder)
    assert not build._built_from(done, first)  # a first pass is not the second pass that --pii-second-epochs asks for


def test_a_pii_pass_recorded_with_a_checkout_relative_base_is_recognised(tmp_path):
    import json

    from models import build

    done = tmp_path / "pii"
    done.mkdir()
    (done / "model.int8.onnx").write_bytes(b"onnx")
    (done / "eval_results.json").write_text(json.dumps({"base_model": "build/models/encoder"}))  # as ship() writes
    assert build._built_from(done, build.ROOT / "build" / "models" / "encoder")
    assert not build._built_from(done, build.ROOT / "build" / "models" / "pii-first")


def _dry_build(tmp_path, monkeypatch, *argv: str) -> list[tuple[str, ...]]:
    """models/build.py's steps as run by main(), with every trainer call and score stubbed: what ran, in order."""
    import json

    from models import build

    calls: list[tuple[str, ...]] = []

    def run(*args: str) -> None:
        calls.append(args)
        out = Path(args[args.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if args[0] == "base":
            spec = build.SIZES[args[args.index("--size") + 1]]
            (out / "config.json").write_text(json.dumps({"num_hidden_layers": spec.num_hidden_layers,
                                                         "hidden_size": spec.hidden_size,
                                                         "intermediate_size": spec.intermediate_size}))
        elif args[0] == "ensemble":
            from trainer.ensemble import file_digest

            (out / "model.int8.onnx").write_bytes(b"onnx")
            members = [{"path": m, "sha256": {"model.int8.onnx": file_digest(Path(m) / "model.int8.onnx")}}
                       for m in args[1:args.index("--output")]]
            (out / "eval_results.json").write_text(json.dumps({"ensemble": {"members": members}}))
        elif args[0] == "pretrain":
            base = Path(args[args.index("--base-model") + 1])
            (out / "config.json").write_text((base / "config.json").read_text())
            (out / "pretrain_results.json").write_text(json.dumps({"settings": {"epochs": 3.0}}))
        else:
            (out / "config.json").write_text("{}")
            (out / "model.int8.onnx").write_bytes(f"onnx {len(calls)} {out}".encode())  # a new file per training
            taught = {"teacher": {"model": args[args.index("--teacher") + 1]}} if "--teacher" in args else {}
            (out / "eval_results.json").write_text(json.dumps({"base_model": args[args.index("--base-model") + 1],
                                                               "settings": {"epochs": float(args[args.index("--epochs") + 1])},
                                                               **taught}))

    monkeypatch.setattr(build, "run", run)
    monkeypatch.setattr(build, "split_data", lambda *a: {k: tmp_path / f"{k}.jsonl" for k in build.SPLITS})
    monkeypatch.setattr(build, "teacher_path", lambda: "teacher")
    monkeypatch.setattr(build, "category_report", lambda *a, **k: {})
    monkeypatch.setattr(build, "pii_report", lambda *a, **k: {})
    monkeypatch.setattr(build, "category_notes", lambda r: [])
    monkeypatch.setattr(build, "pii_notes", lambda r: [])
    monkeypatch.setattr(build, "person_bias", lambda paths, members: (1.25, "how"))
    monkeypatch.setattr(build, "ship", lambda built, target, extra, note: calls.append(("ship", target.name, note)))
    monkeypatch.setattr(build, "record_cost", lambda replaced, out: calls.append(("cost",)))
    monkeypatch.setattr(build, "cost_yardstick", lambda work, out: work / "replaced")
    monkeypatch.setattr(sys, "argv", ["build.py", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
                                      "--teacher-epochs", "0", *argv])
    build.main()
    return calls


def _student(calls, task: str) -> tuple[str, ...]:
    """The trainer call that builds what ships for `task` (not a teacher)."""
    return next(c for c in calls if c[0] == task and Path(c[c.index("--output") + 1]).name == task)


def _base_model(calls, task: str) -> str:
    args = _student(calls, task)
    return Path(args[args.index("--base-model") + 1]).name


def test_the_build_fine_tunes_each_model_from_its_sizes_encoder_pii_first(tmp_path, monkeypatch):
    calls = _dry_build(tmp_path, monkeypatch, "--no-pii-ensemble")

    assert sorted(c[2] for c in calls if c[0] == "base") == ["medium", "small"]
    assert (_base_model(calls, "category"), _base_model(calls, "pii")) == ("encoder-medium", "encoder")
    shipped = [c for c in calls if c[0] in ("ship", "cost")]
    assert [c[1] if c[0] == "ship" else "cost" for c in shipped] == ["pii", "category", "cost"]
    assert "a medium ModernBERT (6 layers" in shipped[1][2] and "a small ModernBERT (4 layers" in shipped[0][2]


def test_a_category_model_from_another_sizes_encoder_is_trained_again(tmp_path, monkeypatch):
    _dry_build(tmp_path, monkeypatch, "--category-size", "small", "--no-pii-ensemble")
    again = _dry_build(tmp_path, monkeypatch, "--no-pii-ensemble")
    reused = _dry_build(tmp_path, monkeypatch, "--no-pii-ensemble")

    assert [c[0] for c in again if c[0] in ("base", "category", "pii")] == ["base", "category"]  # PII kept
    assert not [c for c in reused if c[0] in ("base", "pretrain", "category", "pii")]


def test_the_pii_student_learns_from_the_teacher_fine_tuned_once_on_the_same_rows(tmp_path, monkeypatch):
    calls = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--pii-teacher-epochs", "3", "--no-pii-ensemble")
    again = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--pii-teacher-epochs", "3", "--no-pii-ensemble")
    untaught = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--no-pii-ensemble")

    coach, student = [c for c in calls if c[0] == "pii"]
    assert coach[coach.index("--base-model") + 1] == "teacher" and coach[coach.index("--epochs") + 1] == "3"
    assert coach[coach.index("--train") + 1: coach.index("--base-model")] == \
        student[student.index("--train") + 1: student.index("--base-model")]
    assert "--int8" not in coach  # never served
    assert Path(student[student.index("--teacher") + 1]) == Path(coach[coach.index("--output") + 1])
    assert not [c for c in again if c[0] == "pii"]  # both reused
    assert [c for c in untaught if c[0] == "pii"] and all("--teacher" not in c for c in untaught)


def test_a_pii_teacher_of_other_epochs_is_built_again_and_so_is_every_pass_after_it(tmp_path, monkeypatch):
    single = ("--no-pii-ensemble", "--pii-second-epochs", "2")
    _dry_build(tmp_path, monkeypatch, "--only", "pii", "--pii-teacher-epochs", "3", *single)
    longer = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--pii-teacher-epochs", "4", *single)

    outputs = [Path(c[c.index("--output") + 1]).name for c in longer if c[0] == "pii"]
    assert outputs == ["pii-teacher", "pii-first", "pii"]
    coach = next(c for c in longer if c[0] == "pii")
    assert coach[coach.index("--epochs") + 1] == "4"


def test_one_model_builds_only_its_own_encoder(tmp_path, monkeypatch):
    calls = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--no-pii-ensemble")

    assert [c[2] for c in calls if c[0] == "base"] == ["small"]
    assert not [c for c in calls if c[0] == "category"]


def _output(call: tuple[str, ...]) -> str:
    return Path(call[call.index("--output") + 1]).name


def test_the_pii_model_that_ships_joins_a_labels_student_and_a_teacher_taught_medium_one(tmp_path, monkeypatch):
    calls = _dry_build(tmp_path, monkeypatch, "--only", "pii")
    again = _dry_build(tmp_path, monkeypatch, "--only", "pii")

    assert sorted(c[2] for c in calls if c[0] == "base") == ["medium", "small"]
    coach, labels, taught = [c for c in calls if c[0] == "pii"]
    assert [_output(c) for c in (coach, labels, taught)] == ["pii-teacher", "pii-labels", "pii-taught"]
    assert coach[coach.index("--epochs") + 1] == "3"  # the taught member needs a teacher: 3 epochs by default
    assert Path(labels[labels.index("--base-model") + 1]).name == "encoder" and "--teacher" not in labels
    assert Path(taught[taught.index("--base-model") + 1]).name == "encoder-medium"
    assert Path(taught[taught.index("--teacher") + 1]).name == "pii-teacher"
    (join,) = [c for c in calls if c[0] == "ensemble"]
    assert [Path(m).name for m in join[1:join.index("--output")]] == ["pii-labels", "pii-taught"]
    assert _output(join) == "pii" and join[join.index("--entity-bias") + 1] == "PERSON=1.25"
    assert next(c for c in calls if c[0] == "ship")[:2] == ("ship", "pii")
    assert not [c for c in again if c[0] in ("pii", "ensemble")]  # members and the join reused


def test_a_new_teacher_retrains_only_the_taught_member_and_joins_again(tmp_path, monkeypatch):
    _dry_build(tmp_path, monkeypatch, "--only", "pii")
    longer = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--pii-teacher-epochs", "4")

    assert [_output(c) for c in longer if c[0] in ("pii", "ensemble")] == ["pii-teacher", "pii-taught", "pii"]


def test_a_member_changed_after_the_join_is_joined_again_without_retraining(tmp_path, monkeypatch):
    _dry_build(tmp_path, monkeypatch, "--only", "pii")
    (tmp_path / "w" / "pii-labels" / "model.int8.onnx").write_bytes(b"retrained, then the run stopped")
    resumed = _dry_build(tmp_path, monkeypatch, "--only", "pii")

    assert [(c[0], _output(c)) for c in resumed if c[0] in ("pii", "ensemble")] == [("ensemble", "pii")]


def test_another_size_for_the_labels_member_leaves_the_taught_member_alone(tmp_path, monkeypatch):
    _dry_build(tmp_path, monkeypatch, "--only", "pii")
    resized = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--pii-size", "medium")

    assert [_output(c) for c in resized if c[0] in ("pii", "ensemble")] == ["pii-labels", "pii"]


def test_the_single_student_after_an_ensemble_build_is_its_labels_member_copied_not_retrained(tmp_path, monkeypatch):
    _dry_build(tmp_path, monkeypatch, "--only", "pii")
    single = _dry_build(tmp_path, monkeypatch, "--only", "pii", "--no-pii-ensemble")
    w = tmp_path / "w"

    assert not [c for c in single if c[0] in ("pii", "ensemble")]
    assert (w / "pii" / "model.int8.onnx").read_bytes() == (w / "pii-labels" / "model.int8.onnx").read_bytes()
    assert [c[1] for c in single if c[0] == "ship"] == ["pii"]


def test_the_labels_member_after_a_single_student_build_is_that_student_copied_not_retrained(tmp_path, monkeypatch):
    _dry_build(tmp_path, monkeypatch, "--only", "pii", "--no-pii-ensemble")
    single = (tmp_path / "w" / "pii" / "model.int8.onnx").read_bytes()
    pair = _dry_build(tmp_path, monkeypatch, "--only", "pii")

    assert [_output(c) for c in pair if c[0] in ("pii", "ensemble")] == ["pii-teacher", "pii-taught", "pii"]
    assert (tmp_path / "w" / "pii-labels" / "model.int8.onnx").read_bytes() == single


def test_a_taught_single_student_is_never_copied_as_the_labels_member(tmp_path, monkeypatch):
    _dry_build(tmp_path, monkeypatch, "--only", "pii", "--no-pii-ensemble", "--pii-teacher-epochs", "3")
    pair = _dry_build(tmp_path, monkeypatch, "--only", "pii")

    assert [_output(c) for c in pair if c[0] in ("pii", "ensemble")] == ["pii-labels", "pii-taught", "pii"]


def test_the_bias_is_the_first_on_the_grid_to_reach_the_members_average_or_the_last_one():
    from models import build

    chosen, counts = build.smallest_bias(lambda bias: int(100 + 20 * bias), 111)
    assert chosen == 0.75 and list(counts) == [0.0, 0.25, 0.5, 0.75]
    chosen, counts = build.smallest_bias(lambda bias: 100, 111)
    assert chosen == build.BIAS_GRID[-1] and len(counts) == len(build.BIAS_GRID)


@pytest.mark.parametrize("flags", [("--pii-teacher-epochs", "0"), ("--pii-second-epochs", "2")])
def test_the_ensemble_refuses_options_it_cannot_honour(tmp_path, monkeypatch, flags):
    with pytest.raises(SystemExit):
        _dry_build(tmp_path, monkeypatch, "--only", "pii", *flags)


def test_the_pii_card_holds_everyday_questions_to_no_mask_at_all_and_real_text_to_two_percent():
    from models import build

    clean = {"texts": 100, "with_any_mask": 0.01, "with_person_contact_or_number_mask": 0.01}
    report = {"baseline_recognizers_only": {"presidio_held_out_templates": {"caught": 0.1}},
              "served": {"presidio_held_out_templates": {"caught": 0.95, "type_right": 0.99},
                         "any_position_1_8kb": {"caught": 0.96}, "wnut17_real_text": {"per_type": {}},
                         "exam_questions_name_free": clean, "wnut17_entity_free": clean, "everyday_questions": clean}}
    notes = build.pii_notes(report)
    assert "exam_questions_name_free: 1.0% of 100 PII-free texts get a false person, contact or number mask " \
           "(meets the 2% target)." in notes
    assert "everyday_questions: 1.0% of 100 PII-free texts get any mask (misses the target of none)." in notes
    report["served"]["everyday_questions"] = clean | {"with_any_mask": 0.0}
    assert any("(meets the target of none)" in n for n in build.pii_notes(report))
