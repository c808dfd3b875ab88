"""Shared fixtures: tiny ModernBERT models built offline, the way `trainer base` builds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.factories import corpus_file

PII_LABELS = ["O", "B-EMAIL_ADDRESS", "I-EMAIL_ADDRESS", "B-PERSON", "I-PERSON", "B-PHONE_NUMBER", "I-PHONE_NUMBER"]
CATEGORY_LABELS = ["biology", "law", "math"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """An untrained tiny ModernBERT with its own byte-level BPE tokenizer (no Hub access)."""
    from trainer.base import build_base

    root = tmp_path_factory.mktemp("tiny_base")
    return build_base("tiny", [corpus_file(root / "corpus.txt")], root / "model")


def make_untrained_model_dir(base: Path, out: Path, task: str, labels: list[str]) -> Path:
    """A valid but untrained model directory for `task` (weights only; no ONNX)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    cls = AutoModelForSequenceClassification if task == "category" else AutoModelForTokenClassification
    torch.manual_seed(0)  # the new head's weights: the same untrained model in every run and test order
    model = cls.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}
    )
    model.config.sidecar_task = task
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_category_dir(tiny_base, tmp_path_factory) -> Path:
    return make_untrained_model_dir(tiny_base, tmp_path_factory.mktemp("category"), "category", CATEGORY_LABELS)


@pytest.fixture(scope="session")
def tiny_pii_dir(tiny_base, tmp_path_factory) -> Path:
    return make_untrained_model_dir(tiny_base, tmp_path_factory.mktemp("pii"), "pii", PII_LABELS)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True)
def _default_logging():
    """Each test starts from the default log setup: a test that points logs at its own stream (since
    closed) must not leak that stream into the tests after it."""
    from sidecar.config import LoggingConfig
    from sidecar.logs import configure_logging

    configure_logging(LoggingConfig())
    yield
    configure_logging(LoggingConfig())


@pytest.fixture(scope="session")
def stack_category_dir(tiny_base, tmp_path_factory) -> Path:
    """An untrained tiny classifier with router.yaml's own labels, so the stacks' routing tables apply unchanged."""
    import yaml

    from sidecar_demo.configs import ROUTER_CONFIG

    labels = list(yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8"))["routing"]["categories"])
    return make_untrained_model_dir(tiny_base, tmp_path_factory.mktemp("stack_category"), "category", labels)


@pytest.fixture(scope="session")
def stack_pii_dir(tiny_base, tmp_path_factory) -> Path:
    return make_untrained_model_dir(tiny_base, tmp_path_factory.mktemp("stack_pii"), "pii", PII_LABELS)


@pytest.fixture(scope="session")
def bert_base(tmp_path_factory) -> Path:
    """An untrained tiny BertModel and BertTokenizerFast; its config.json has no cls/sep token ids."""
    from tests.trainer_helpers import bert_tokenizer_fast, save_tiny_bert

    root = tmp_path_factory.mktemp("bert_base")
    fast = bert_tokenizer_fast(corpus_file(root / "corpus.txt").read_text(encoding="utf-8").splitlines())
    path = save_tiny_bert(root / "model", fast)
    config = read_json(path / "config.json")
    assert "cls_token_id" not in config and "sep_token_id" not in config  # what a BERT base looks like
    return path


@pytest.fixture(scope="session")
def bert_category(bert_base, tmp_path_factory) -> Path:
    """A category model (biology, law, math) fine-tuned for two steps on the tiny BERT."""
    from tests.factories import category_rows, write_jsonl
    from tests.trainer_helpers import FAST
    from trainer.cli import main

    root = tmp_path_factory.mktemp("bert_category")
    train = write_jsonl(root / "train.jsonl", category_rows(6))
    out = root / "model"
    assert main(["category", "--train", str(train), "--base-model", str(bert_base), "--output", str(out),
                 "--max-length", "32", *FAST]) == 0
    return out
