"""A student ModernBERT built from a pretrained teacher: its tokenizer and word embeddings (`trainer base
--embeddings-from`), then its hidden states (`trainer pretrain --teacher`); the student trains and serves.

The teacher is a tiny BertModel made offline (all-MiniLM-L6-v2 in shape: WordPiece, lower-casing, a config
with only pad_token_id), wider than the tiny student so the PCA has something to drop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig
from sidecar.inference.engine import Engine
from tests.conftest import read_json
from tests.factories import category_rows, corpus_file, write_jsonl
from tests.trainer_helpers import FAST, bert_tokenizer_fast, run_cli, save_tiny_bert
from trainer.base import SIZES

TEACHER_WIDTH = 96  # the tiny student is 64 wide


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    fast = bert_tokenizer_fast(corpus_file(root / "corpus.txt").read_text(encoding="utf-8").splitlines())
    return save_tiny_bert(root / "model", fast, hidden_size=TEACHER_WIDTH)


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    from trainer.cli import main

    out = tmp_path_factory.mktemp("student") / "base"
    assert main(["base", "--size", "tiny", "--embeddings-from", str(teacher), "--output", str(out)]) == 0
    return out


def _embeddings(path: Path, auto: str = "AutoModelForMaskedLM"):
    import transformers

    return getattr(transformers, auto).from_pretrained(path).get_input_embeddings().weight.detach()


def test_student_base_takes_the_teachers_tokenizer_and_special_token_ids(teacher, student):
    assert read_json(student / "tokenizer.json")["model"]["vocab"] == read_json(teacher / "tokenizer.json")["model"]["vocab"]
    vocab = read_json(teacher / "tokenizer.json")["model"]["vocab"]
    config = read_json(student / "config.json")
    assert config["model_type"] == "modernbert" and config["vocab_size"] == len(vocab)
    assert {k: config[k] for k in ("pad_token_id", "cls_token_id", "sep_token_id")} == {
        "pad_token_id": vocab["[PAD]"], "cls_token_id": vocab["[CLS]"], "sep_token_id": vocab["[SEP]"]}


def test_student_word_embeddings_are_the_teachers_principal_components(teacher, student):
    import torch

    theirs = _embeddings(teacher, "AutoModel")
    ours = _embeddings(student)
    assert ours.shape == (theirs.shape[0], SIZES["tiny"].hidden_size)
    centred = theirs - theirs.mean(dim=0)
    # PCA keeps the most variance any 64 directions can: at least 64/96 of it, far more than random init
    assert (ours.pow(2).sum() / centred.pow(2).sum()).item() >= SIZES["tiny"].hidden_size / TEACHER_WIDTH
    # ... in uncorrelated coordinates, largest first
    cov = ours.T @ ours
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    assert off_diagonal.abs().max().item() < 1e-3 * cov.diagonal().max().item()
    assert torch.all(cov.diagonal()[:-1] >= cov.diagonal()[1:] - 1e-5)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_each_shipped_size_builds_from_a_teacher_with_its_own_shape(teacher, size, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "base", "--size", size, "--embeddings-from", teacher, "--output", tmp_path / size)

    config, spec = read_json(tmp_path / size / "config.json"), SIZES[size]
    assert code == 0
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        spec.num_hidden_layers, spec.hidden_size, spec.intermediate_size)
    assert _embeddings(tmp_path / size).shape == (config["vocab_size"], spec.hidden_size)


def test_medium_is_deeper_and_wider_than_small_at_the_same_width():
    small, medium = SIZES["small"], SIZES["medium"]
    assert medium.hidden_size == small.hidden_size  # the same PCA'd word embeddings fit both
    assert medium.num_hidden_layers > small.num_hidden_layers and medium.intermediate_size > small.intermediate_size


def test_base_needs_a_corpus_or_a_teacher(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "base", "--size", "tiny", "--output", tmp_path / "out")

    assert code == 2
    assert "--corpus" in stderr and "--embeddings-from" in stderr


@pytest.mark.slow
def test_pretrain_with_a_teacher_brings_the_students_hidden_states_toward_the_teachers(teacher, student, tmp_path, capsys):
    corpus = corpus_file(tmp_path / "corpus.txt")
    out = tmp_path / "encoder"

    code, _, stderr = run_cli(capsys, "pretrain", "--base-model", student, "--teacher", teacher, "--corpus", corpus,
                              "--output", out, "--epochs", "8", "--batch-size", "8", "--learning-rate", "3e-3",
                              "--validation-fraction", "0.2")

    assert code == 0, stderr
    results = read_json(out / "pretrain_results.json")
    assert results["teacher"] == str(teacher)
    metrics = results["metrics"]
    assert metrics["validation_loss"] < 0.8 * metrics["validation_loss_at_start"]  # held-out texts, not the trained ones
    assert "validation_perplexity" not in metrics  # no masked tokens, no perplexity
    assert read_json(out / "config.json")["model_type"] == "modernbert"
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_pretrain_with_a_teacher_of_another_vocabulary_fails_naming_the_fix(teacher, tmp_path, capsys):
    corpus = corpus_file(tmp_path / "corpus.txt")
    own = tmp_path / "own"
    assert run_cli(capsys, "base", "--size", "tiny", "--corpus", corpus, "--output", own)[0] == 0

    code, _, stderr = run_cli(capsys, "pretrain", "--base-model", own, "--teacher", teacher, "--corpus", corpus,
                              "--output", tmp_path / "out", "--max-steps", "1")

    assert code == 2
    assert str(teacher) in stderr and f"trainer base --embeddings-from {teacher}" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_distilled_student_fine_tunes_exports_and_serves_with_the_teachers_tokenizer(teacher, student, tmp_path, capsys):
    corpus = corpus_file(tmp_path / "corpus.txt")
    encoder, model = tmp_path / "encoder", tmp_path / "category"
    assert run_cli(capsys, "pretrain", "--base-model", student, "--teacher", teacher, "--corpus", corpus,
                   "--output", encoder, "--max-steps", "2")[0] == 0
    train = write_jsonl(tmp_path / "train.jsonl", category_rows(6))
    code, _, stderr = run_cli(capsys, "category", "--train", train, "--base-model", encoder, "--output", model,
                              "--max-length", "32", "--max-steps", "2", "--eval-steps", "2", "--export")
    assert code == 0, stderr
    # fp32 ONNX, not INT8: a two-step model's logits are near ties, so INT8's argmax agreement with PyTorch is a
    # coin flip across CPUs (CI once got 0.85 against the 0.9 floor); tests/test_trainer_bert_family.py covers INT8.

    engine = Engine.load(ModelsConfig(category=ModelConfig(path=str(model), runtime="onnx", device="cpu")),
                         BatchingConfig(), checksums=False)
    try:
        results = engine.classify_many(["Which organelle makes ATP in the cell?", "ÉMILIE PAID €49,90 AT THE CAFÉ"])
    finally:
        engine.close()
    assert all(r.label in {"biology", "law", "math"} and 0 < r.confidence <= 1 for r in results)


# --- fine-tuning with a teacher's soft labels ------------------------------------------------------------


class _Outputs:
    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


def _loss(teacher_weight: float, temperature: float, student, teacher, labels):
    """DistillationTrainer.compute_loss on a model that returns `student` logits and their cross-entropy."""
    import torch
    from torch.nn import functional as F

    from trainer.distill import distillation_trainer

    cls = distillation_trainer(teacher_weight, temperature)
    trainer = cls.__new__(cls)  # compute_loss needs no Trainer state

    def model(**inputs):
        assert set(inputs) == {"input_ids", "labels"}  # the teacher's logits never reach the model
        return _Outputs(student, F.cross_entropy(student, inputs["labels"]))

    inputs = {"input_ids": torch.zeros(len(labels), 3, dtype=torch.long), "labels": torch.tensor(labels)}
    if teacher is not None:
        inputs["teacher_logits"] = teacher
    return trainer.compute_loss(model, inputs)


def test_distillation_loss_mixes_cross_entropy_with_the_softened_kl_from_the_teacher():
    import torch
    from torch.nn import functional as F

    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, -1.0, 0.5]])
    labels = [0, 2]
    ce = F.cross_entropy(student, torch.tensor(labels))
    t = 2.0
    p = F.softmax(teacher / t, dim=-1)
    kl = (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum(dim=-1).mean() * t * t

    assert torch.isclose(_loss(0.3, t, student, teacher, labels), 0.7 * ce + 0.3 * kl)
    assert torch.isclose(_loss(0.5, t, student, student.clone(), labels), 0.5 * ce)  # agreeing with the teacher costs nothing
    assert torch.isclose(_loss(0.5, t, student, None, labels), ce)  # rows without a teacher (validation): labels only


@pytest.mark.slow
def test_teacher_logits_follow_the_students_label_order_whatever_the_teachers(bert_category):
    from trainer.distill import teacher_logits

    texts = ["Which organelle makes ATP in the cell?", "Solve for x: 3x + 5 = 11.", "Is a verbal contract binding?"]
    ours = teacher_logits(str(bert_category), texts, ["biology", "law", "math"], max_length=32, batch_size=2)
    reordered = teacher_logits(str(bert_category), texts, ["math", "law", "biology"], max_length=32)
    assert len(ours) == len(texts) and all(len(row) == 3 for row in ours)
    flipped = [x for row in ours for x in row[::-1]]
    assert flipped == pytest.approx([x for row in reordered for x in row], abs=1e-5)


@pytest.mark.slow
def test_category_trains_with_a_teacher_and_records_it(bert_base, bert_category, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", category_rows(6))
    out = tmp_path / "student"

    code, _, stderr = run_cli(capsys, "category", "--train", train, "--base-model", bert_base, "--output", out,
                              "--teacher", bert_category, "--teacher-weight", "0.7", "--max-length", "32", *FAST)

    assert code == 0, stderr
    assert read_json(out / "eval_results.json")["teacher"] == {"model": str(bert_category), "weight": 0.7,
                                                               "temperature": 2.0}


@pytest.mark.slow
def test_teacher_with_other_labels_fails_before_training_naming_both(bert_base, bert_category, tmp_path, capsys):
    rows = [{**r, "label": {"math": "physics"}.get(r["label"], r["label"])} for r in category_rows(6)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)

    code, _, stderr = run_cli(capsys, "category", "--train", train, "--base-model", bert_base, "--output",
                              tmp_path / "out", "--teacher", bert_category, *FAST)

    assert code == 2
    assert str(bert_category) in stderr and "biology, law, math" in stderr and "biology, law, physics" in stderr


def test_token_distillation_loss_compares_the_teacher_only_on_tokens_that_carry_a_label():
    import torch
    from torch.nn import functional as F

    from trainer.distill import distillation_trainer

    student = torch.tensor([[[2.0, 0.5], [9.0, -9.0], [0.1, 0.3]]])  # token 1 (a sub-word or special token) has no label
    teacher = torch.tensor([[[0.0, 3.0], [-9.0, 9.0], [1.0, -1.0]]])
    labels = torch.tensor([[0, -100, 1]])
    cls = distillation_trainer(0.4, 2.0)
    trainer = cls.__new__(cls)

    def model(**inputs):
        ce = F.cross_entropy(student.view(-1, 2), inputs["labels"].view(-1), ignore_index=-100)
        return _Outputs(student, ce)

    loss = trainer.compute_loss(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": labels,
                                        "teacher_logits": teacher})

    kept_s, kept_t = student[0, [0, 2]], teacher[0, [0, 2]]
    p = F.softmax(kept_t / 2.0, dim=-1)
    kl = (p * (p.log() - F.log_softmax(kept_s / 2.0, dim=-1))).sum(dim=-1).mean() * 4.0
    ce = F.cross_entropy(kept_s, torch.tensor([0, 1]))
    assert torch.isclose(loss, 0.6 * ce + 0.4 * kl)


def test_teacher_padding_pads_each_windows_logits_to_the_batch_length():
    import torch

    from trainer.distill import TeacherPadding

    def collator(features):
        return {"input_ids": torch.zeros(len(features), 8, dtype=torch.long)}  # padded to a multiple of 8

    batch = TeacherPadding(collator)([{"input_ids": [1, 2], "teacher_logits": [[1.0, 2.0], [3.0, 4.0]]},
                                      {"input_ids": [1, 2, 3], "teacher_logits": [[5.0, 6.0]] * 3}])

    assert batch["teacher_logits"].shape == (2, 8, 2)
    assert batch["teacher_logits"][0, :2].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert batch["teacher_logits"][1, 2].tolist() == [5.0, 6.0] and batch["teacher_logits"][0, 2:].abs().sum() == 0
    assert "teacher_logits" not in TeacherPadding(collator)([{"input_ids": [1, 2]}])  # validation rows have none
    left = TeacherPadding(collator, "left")([{"input_ids": [1, 2], "teacher_logits": [[1.0, 2.0], [3.0, 4.0]]}])
    assert left["teacher_logits"][0, 6:].tolist() == [[1.0, 2.0], [3.0, 4.0]]  # where a left-padding tokenizer puts them


@pytest.mark.slow
def test_token_teacher_logits_follow_the_students_label_order_whatever_the_teachers(pii_teacher):
    from transformers import AutoTokenizer

    from trainer.distill import token_teacher_logits

    tokenizer = AutoTokenizer.from_pretrained(pii_teacher)
    labels = read_json(pii_teacher / "config.json")["id2label"]
    ours = [labels[str(i)] for i in range(len(labels))]
    windows = [tokenizer("Mail Jane Roe at the office.")["input_ids"], tokenizer("Which organelle?")["input_ids"]]

    straight = token_teacher_logits(str(pii_teacher), tokenizer, windows, ours)
    flipped = token_teacher_logits(str(pii_teacher), tokenizer, windows, ours[::-1])

    assert [len(w) for w in straight] == [len(w) for w in windows] and len(straight[0][0]) == len(ours)
    reversed_straight = [x for w in straight for row in w for x in row[::-1]]
    assert reversed_straight == pytest.approx([x for w in flipped for row in w for x in row], abs=1e-5)


def _pii_rows() -> list[dict]:
    return [{"text": "Mail Jane Roe at the office.", "spans": [{"start": 5, "end": 13, "label": "PERSON"}]},
            {"text": "Which organelle makes ATP?", "spans": []}] * 3


@pytest.fixture(scope="module")
def pii_teacher(teacher, tmp_path_factory) -> Path:
    """The tiny BERT fine-tuned for two steps as a PII model: it reads with the student's tokenizer."""
    from trainer.cli import main

    root = tmp_path_factory.mktemp("pii_teacher")
    train = write_jsonl(root / "train.jsonl", _pii_rows())
    assert main(["pii", "--train", str(train), "--base-model", str(teacher), "--output", str(root / "model"),
                 "--max-length", "32", "--stride", "8", *FAST]) == 0
    return root / "model"


@pytest.mark.slow
def test_pii_learns_a_teacher_that_reads_its_tokens_and_records_it(student, pii_teacher, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _pii_rows())
    out = tmp_path / "student"

    code, _, stderr = run_cli(capsys, "pii", "--train", train, "--base-model", student, "--output", out,
                              "--teacher", pii_teacher, "--max-length", "32", "--stride", "8", *FAST)

    assert code == 0, stderr
    assert read_json(out / "eval_results.json")["teacher"] == {"model": str(pii_teacher), "weight": 0.5,
                                                               "temperature": 2.0}


@pytest.mark.slow
def test_pii_teacher_with_another_tokenizer_fails_before_training_naming_the_fix(pii_teacher, tmp_path, capsys):
    corpus = corpus_file(tmp_path / "corpus.txt")
    own = tmp_path / "own"
    assert run_cli(capsys, "base", "--size", "tiny", "--corpus", corpus, "--output", own)[0] == 0
    train = write_jsonl(tmp_path / "train.jsonl", _pii_rows())

    code, _, stderr = run_cli(capsys, "pii", "--train", train, "--base-model", own, "--output", tmp_path / "out",
                              "--teacher", pii_teacher, *FAST)

    assert code == 2
    assert str(pii_teacher) in stderr and f"trainer base --embeddings-from {pii_teacher}" in stderr
