import json
import shutil

import pytest

from model_contract.model_dir import ModelDir, ModelDirError


def test_reads_task_labels_and_special_tokens_from_config(tiny_category_dir):
    md = ModelDir.read(tiny_category_dir)
    assert md.task == "category"
    assert md.labels == ["biology", "law", "math"]
    tok = md.load_tokenizer()
    ids = tok.encode("hello world").ids
    assert ids[0] == md.cls_token_id and ids[-1] == md.sep_token_id


def test_rejects_a_model_of_the_other_task(tiny_pii_dir):
    with pytest.raises(ModelDirError, match="is a 'pii' model"):
        ModelDir.read(tiny_pii_dir, expect_task="category")


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        ModelDir.read(tmp_path / "nope")


def test_pii_model_without_outside_tag_is_rejected(tiny_pii_dir, tmp_path):
    copy = shutil.copytree(tiny_pii_dir, tmp_path / "m")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["id2label"] = {"0": "B-PERSON", "1": "I-PERSON"}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="'O' label"):
        ModelDir.read(copy)
