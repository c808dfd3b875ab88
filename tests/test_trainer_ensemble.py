"""`trainer ensemble`: members' ONNX graphs joined into one that averages their logits, served like any model
directory; members that would read a text differently are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import PII_LABELS, read_json
from tests.trainer_helpers import run_cli
from trainer.ensemble import EnsembleError, build_ensemble
from trainer.export import export_model_dir


def _logits(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def _shift_head(path: Path, amount: float) -> None:
    """Make a second member that disagrees with the first: add `amount` to every classifier bias."""
    model = onnx.load(path)
    for init in model.graph.initializer:
        if "classifier" in init.name and "bias" in init.name:
            arr = onnx.numpy_helper.to_array(init) + np.linspace(0, amount, init.dims[0], dtype=np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
            onnx.save(model, path)
            return
    raise AssertionError("no classifier bias in the graph")


@pytest.fixture(scope="module")
def members(tiny_pii_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("members")
    a = shutil.copytree(tiny_pii_dir, root / "a")
    export_model_dir(a, int8=False)
    b = shutil.copytree(a, root / "b")
    _shift_head(b / "model.onnx", 3.0)
    return a, b


@pytest.fixture
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, size=(3, 17), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    return ids, mask


def test_ensemble_logits_are_the_mean_of_its_members(members, batch, tmp_path):
    a, b = members
    build_ensemble([a, b], tmp_path / "ens")
    got = _logits(tmp_path / "ens" / "model.onnx", *batch)
    la, lb = _logits(a / "model.onnx", *batch), _logits(b / "model.onnx", *batch)
    assert np.abs(la - lb).max() > 0.5  # the members disagree, so the mean is not either one
    np.testing.assert_allclose(got, (la + lb) / 2, atol=1e-4)


def test_weights_set_each_members_share(members, batch, tmp_path):
    a, b = members
    build_ensemble([a, b], tmp_path / "ens", weights=[3, 1])
    got = _logits(tmp_path / "ens" / "model.onnx", *batch)
    want = 0.75 * _logits(a / "model.onnx", *batch) + 0.25 * _logits(b / "model.onnx", *batch)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_entity_bias_is_added_to_that_types_logits_after_the_mean(members, batch, tmp_path):
    a, b = members
    build_ensemble([a, b], tmp_path / "ens", entity_bias={"PERSON": 1.5})
    labels = [read_json(a / "config.json")["id2label"][str(i)] for i in range(len(PII_LABELS))]
    shift = np.array([1.5 if label in ("B-PERSON", "I-PERSON") else 0.0 for label in labels], dtype=np.float32)
    got = _logits(tmp_path / "ens" / "model.onnx", *batch)
    want = (_logits(a / "model.onnx", *batch) + _logits(b / "model.onnx", *batch)) / 2 + shift
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert read_json(tmp_path / "ens" / "eval_results.json")["ensemble"]["entity_bias"] == {"PERSON": 1.5}
    assert "PERSON +1.5" in (tmp_path / "ens" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("bias, message", [({"IBAN_CODE": 1.0}, "do not tag"), ({"PERSON": 50.0}, r"\[-20, 20\]")])
def test_entity_bias_for_a_type_the_members_do_not_tag_or_out_of_range_is_refused(members, tmp_path, bias, message):
    with pytest.raises(EnsembleError, match=message):
        build_ensemble(list(members), tmp_path / "ens", entity_bias=bias)


def test_members_past_protobufs_limit_are_joined_with_their_weights_in_an_external_file(members, batch, tmp_path,
                                                                                        monkeypatch):
    from trainer import export

    a, b = members
    external = shutil.copytree(a, tmp_path / "external")  # as `trainer export` writes a large model
    onnx.save(onnx.load(a / "model.onnx"), external / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data")
    graphs = (external / "model.onnx").stat().st_size + (b / "model.onnx").stat().st_size
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", graphs + 1)  # only the weights file puts it past the limit
    build_ensemble([external, b], tmp_path / "ens")
    assert (tmp_path / "ens" / "model.onnx.data").stat().st_size > (tmp_path / "ens" / "model.onnx").stat().st_size
    want = (_logits(a / "model.onnx", *batch) + _logits(b / "model.onnx", *batch)) / 2
    np.testing.assert_allclose(_logits(tmp_path / "ens" / "model.onnx", *batch), want, atol=1e-4)


def test_ensemble_directory_is_served_by_the_sidecar_as_is(members, tmp_path):
    from trainer.served import served_router

    a, b = members
    twin = shutil.copytree(a, tmp_path / "twin")  # a mean of a model and its copy is that model
    build_ensemble([a, twin], tmp_path / "ens")
    texts = ["Call Maria Garcia on +1 415 555 0100.", "Nothing personal in this sentence at all, really."]
    found = {}
    for name, directory in (("alone", a), ("joined", tmp_path / "ens")):
        with served_router(pii=directory, runtime="onnx") as router:
            found[name] = [[(s.label, s.start, s.end, round(s.score, 4)) for s in r.spans]
                           for r in router.engine.predict_many("pii", texts)]
    assert any(found["alone"]) and found["joined"] == found["alone"]  # the untrained model tags something


def test_the_bias_vector_follows_label_ids_past_ten_labels():
    from trainer.ensemble import _bias

    labels = ["O"] + [f"{p}-{t}" for t in ("A", "B", "C", "D", "E", "PERSON") for p in ("B", "I")]
    config = {"id2label": {str(i): label for i, label in enumerate(labels)}}  # "10" sorts before "2" as text
    vector = _bias(config, {"PERSON": 2.0})
    assert [labels[i] for i in np.flatnonzero(vector)] == ["B-PERSON", "I-PERSON"]


def test_a_member_named_twice_or_an_output_over_a_member_is_refused(members, tmp_path):
    a, b = members
    with pytest.raises(EnsembleError, match="twice"):
        build_ensemble([a, a], tmp_path / "ens")
    with pytest.raises(EnsembleError, match="would replace member"):
        build_ensemble([a, b], b)
    with pytest.raises(EnsembleError, match="would replace member"):
        build_ensemble([a, b], b.parent)
    assert (b / "model.onnx").exists() and (b / "config.json").exists()


def test_members_of_different_opsets_are_refused(members, tmp_path):
    a, b = members
    other = shutil.copytree(b, tmp_path / "other")
    model = onnx.load(other / "model.onnx")
    for entry in model.opset_import:
        if entry.domain == "":
            entry.version -= 1
    onnx.save(model, other / "model.onnx")
    with pytest.raises(EnsembleError, match="opsets"):
        build_ensemble([a, other], tmp_path / "ens")


def test_a_member_without_a_tokenizer_is_a_clear_error(members, tmp_path, capsys):
    a, b = members
    other = shutil.copytree(b, tmp_path / "other")
    (other / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "ensemble", a, other, "--output", tmp_path / "ens")
    assert code == 2 and "no tokenizer.json" in err and "Traceback" not in err


def test_report_and_card_name_the_members_and_the_parity_check(members, tmp_path):
    a, b = members
    build_ensemble([a, b], tmp_path / "ens")
    report = read_json(tmp_path / "ens" / "eval_results.json")
    assert [m["path"] for m in report["ensemble"]["members"]] == [str(a), str(b)]
    assert [m["weight"] for m in report["ensemble"]["members"]] == [0.5, 0.5]
    assert report["ensemble"]["parity"]["model.onnx"]["max_abs_diff"] <= 1e-3
    assert report["task"] == "pii" and "O" in report["labels"]
    card = (tmp_path / "ens" / "README.md").read_text(encoding="utf-8")
    assert "## Ensemble" in card and str(b) in card
    assert json.loads((tmp_path / "ens" / "config.json").read_text()) == read_json(a / "config.json")


def test_members_with_another_tokenizer_are_refused(members, tmp_path):
    a, b = members
    other = shutil.copytree(b, tmp_path / "other")
    tokenizer = read_json(other / "tokenizer.json")
    tokenizer["model"]["vocab"]["zzz-extra"] = len(tokenizer["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    with pytest.raises(EnsembleError, match="tokenizer"):
        build_ensemble([a, other], tmp_path / "ens")
    assert not (tmp_path / "ens").exists()


def test_members_with_other_labels_are_refused(members, tmp_path):
    a, b = members
    other = shutil.copytree(b, tmp_path / "other")
    config = read_json(other / "config.json")
    config["id2label"]["1"] = "B-LOCATION"
    (other / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(EnsembleError, match="id2label"):
        build_ensemble([a, other], tmp_path / "ens")


def test_members_without_a_shared_onnx_file_name_the_fix(members, tmp_path):
    a, b = members
    other = shutil.copytree(b, tmp_path / "other")
    (other / "model.onnx").unlink()
    with pytest.raises(EnsembleError, match="trainer export"):
        build_ensemble([a, other], tmp_path / "ens")


def test_cli_builds_an_ensemble_and_refuses_one_member_in_one_line(members, tmp_path, capsys):
    a, b = members
    code, out, _ = run_cli(capsys, "ensemble", a, b, "--output", tmp_path / "ens")
    assert code == 0 and "2 members" in out
    assert (tmp_path / "ens" / "model.onnx").exists()
    code, _, err = run_cli(capsys, "ensemble", a, "--output", tmp_path / "one")
    assert code == 2 and err.strip().count("\n") == 0 and "at least two" in err
    assert not (tmp_path / "one").exists()
