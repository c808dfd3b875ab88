"""`trainer ensemble`: several model directories of one task served as one, their logits averaged.

Students fine-tuned apart (another seed, encoder or teacher) make different mistakes; the mean of their
logits keeps what they agree on. The members' ONNX graphs are joined into one graph with the same inputs
and a ``logits`` output, so the result is an ordinary model directory: the sidecar, `trainer evaluate` and
the bench read it without knowing. The members must read text the same way (the same tokenizer, labels, task
and window), since the sidecar tokenizes a window once for the whole graph. Each keeps its own weights and,
for INT8, its own calibrated ranges; the engine time is about the members' times added up.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from model_contract.eval_results import read_results, write_results
from model_contract.model_dir import ModelDir, ModelDirError

ONNX_FILES = ("model.onnx", "model.int8.onnx")
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json")
_SAME_CONFIG = ("sidecar_task", "id2label", "sidecar_max_length", "cls_token_id", "sep_token_id", "pad_token_id")
PARITY_TOLERANCE = 1e-3
MEMBER_RESULTS = ("base_model", "teacher", "data", "settings", "training", "hardware", "time", "metrics", "per_type",
                  "per_class", "export", "created")
"""What the trainer wrote about how a member was made; what a build recipe added (scores, notes) stays there."""
MEMBER_CONFIG = ("architectures", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")


class EnsembleError(ValueError):
    """Members that cannot be served as one (another tokenizer, labels or task), or a graph that fails its check."""


def build_ensemble(members: Sequence[str | Path], output: str | Path, weights: Sequence[float] | None = None,
                   entity_bias: Mapping[str, float] | None = None) -> dict:
    """Write `output`: the members' ONNX files (each kind every member has) joined into one graph averaging
    their logits (by `weights`, normalised), their shared config and tokenizer, a report and a card.

    `entity_bias` (token models) adds a number to an entity type's B- and I- logits after the mean, as
    ``models.pii.entity_bias`` would when serving: the mean of members that disagree is less sure than either,
    and a build can calibrate that back into the artifact (models/build.py does, on development texts)."""
    dirs = [Path(m) for m in members]
    if len(dirs) < 2:
        raise EnsembleError("an ensemble needs at least two member directories")
    w = _weights(weights, len(dirs))
    _check_dirs(dirs, Path(output))
    configs = [_config(d) for d in dirs]
    _check_alike(dirs, configs)
    bias = _bias(configs[0], entity_bias or {})
    kinds = [f for f in ONNX_FILES if all((d / f).exists() for d in dirs)]
    if not kinds:
        raise EnsembleError(f"no ONNX file that every member has ({' or '.join(ONNX_FILES)}): run `trainer export` "
                            "on each first")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ensemble-", dir=out.parent))
    try:
        for name in COPIED:
            if (dirs[0] / name).exists():
                shutil.copy2(dirs[0] / name, staging / name)
        parity = {}
        for name in kinds:
            merge_graphs([d / name for d in dirs], staging / name, w, bias)
            parity[name] = _check(staging, [d / name for d in dirs], staging / name, w, bias,
                                  configs[0]["sidecar_task"])
        report = _report(dirs, configs[0], w, kinds, parity)
        if entity_bias:
            report["ensemble"]["entity_bias"] = {k: float(v) for k, v in entity_bias.items() if v}
        write_results(staging, report)
        from trainer.card import write_card

        write_card(staging, report)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def merge_graphs(paths: Sequence[Path], out: Path, weights: Sequence[float], bias: np.ndarray | None = None) -> None:
    """One ONNX graph: each member's nodes under its own name prefix, all reading the shared inputs, and
    ``logits`` = the weighted sum of their logits (+ `bias`, one number per label)."""
    import onnx
    from onnx import compose, helper, numpy_helper

    from trainer import export

    models = [onnx.load(str(p)) for p in paths]
    _check_graphs(paths, models)
    nodes, initializers, value_info, scaled = [], [], [], []
    for i, (model, weight) in enumerate(zip(models, weights, strict=True)):
        graph = compose.add_prefix(model, prefix=f"member{i}/", rename_inputs=False, rename_outputs=True).graph
        nodes += graph.node
        initializers += graph.initializer
        value_info += graph.value_info
        # every member name now starts with "member<i>/", so the "ensemble/" names added here cannot clash
        initializers.append(numpy_helper.from_array(np.array(weight, dtype=np.float32), f"ensemble/weight{i}"))
        nodes.append(helper.make_node("Mul", [f"member{i}/logits", f"ensemble/weight{i}"], [f"ensemble/scaled{i}"]))
        scaled.append(f"ensemble/scaled{i}")
    if bias is None:
        nodes.append(helper.make_node("Sum", scaled, ["logits"]))
    else:
        initializers.append(numpy_helper.from_array(bias.astype(np.float32), "ensemble/bias"))
        nodes += [helper.make_node("Sum", scaled, ["ensemble/mean"]),
                  helper.make_node("Add", ["ensemble/mean", "ensemble/bias"], ["logits"])]
    first = models[0].graph
    graph = helper.make_graph(nodes, "ensemble", list(first.input), [o for o in first.output if o.name == "logits"],
                              initializers, value_info=value_info)
    opsets: dict[str, int] = {}
    for model in models:
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                               ir_version=max(m.ir_version for m in models), producer_name="semantic-sidecar ensemble")
    weight_bytes = sum(f.stat().st_size for p in paths for f in (p, p.with_name(p.name + ".data")) if f.exists())
    if weight_bytes > export.EXTERNAL_DATA_BYTES:  # protobuf's 2 GB limit, as `trainer export`
        onnx.save_model(merged, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data")
    else:
        onnx.save_model(merged, str(out))


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise EnsembleError(f"{len(weights)} weights for {n} members")
    if any(not np.isfinite(x) or x <= 0 for x in weights):
        raise EnsembleError("weights must be positive numbers")
    total = float(sum(weights))
    return [float(x) / total for x in weights]


def _bias(config: dict, entity_bias: Mapping[str, float]) -> np.ndarray | None:
    """Per label, what `entity_bias` adds (B- and I- of a type: the sidecar's own `bias_vector`); None when
    nothing is added."""
    from sidecar.errors import ModelLoadError
    from sidecar.inference.heads import BioScheme, bias_vector

    if not any(entity_bias.values()):
        return None
    labels = _labels(config)
    try:
        scheme = BioScheme.from_labels(labels)
    except ModelLoadError:
        raise EnsembleError("entity_bias is for token (PII) models; these members classify sequences") from None
    if any(not -20 <= v <= 20 for v in entity_bias.values()):
        raise EnsembleError("entity_bias values must lie in [-20, 20], as models.pii.entity_bias's do")
    unknown = sorted(set(entity_bias) - set(scheme.entity_types))
    if unknown:
        raise EnsembleError(f"entity_bias names {', '.join(unknown)}, which the members do not tag "
                            f"(they tag {', '.join(sorted(scheme.entity_types))})")
    return bias_vector(scheme, labels, entity_bias)


def _labels(config: dict) -> list[str]:
    """The label names in id order ("10" after "9": the ids are numbers written as strings)."""
    return [config["id2label"][k] for k in sorted(config["id2label"], key=int)]


def _config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise EnsembleError(f"{directory}: no config.json (not a model directory)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "sidecar_task" not in config:
        raise EnsembleError(f"{directory}: config.json has no sidecar_task (not built by trainer)")
    return config


def _check_graphs(paths: Sequence[Path], models: Sequence) -> None:
    """Graphs this joiner can put side by side: the sidecar's inputs and output, one opset (a node is read
    under its graph's opset, and ops change meaning between them), no local functions or sparse weights."""
    opsets = {tuple(sorted((e.domain, e.version) for e in m.opset_import if e.domain in ("", "ai.onnx")))
              for m in models}
    if len(opsets) > 1:
        raise EnsembleError(f"the members use different ONNX opsets ({sorted(opsets)}); export them with one "
                            "trainer version")
    for path, model in zip(paths, models, strict=True):
        if {o.name for o in model.graph.output} != {"logits"} or \
                {x.name for x in model.graph.input} != {"input_ids", "attention_mask"}:
            raise EnsembleError(f"{path}: not a sidecar model graph (inputs input_ids, attention_mask; output logits)")
        if model.functions or model.graph.sparse_initializer:
            raise EnsembleError(f"{path}: a graph with local functions or sparse weights cannot be joined")


def _check_dirs(dirs: Sequence[Path], out: Path) -> None:
    """Each member once, and the output apart from every member (replacing it would delete one)."""
    resolved = [d.resolve() for d in dirs]
    if len(set(resolved)) < len(resolved):
        raise EnsembleError("a member is named twice: its logits would count twice (use --weights)")
    target = out.resolve()
    for d, r in zip(dirs, resolved, strict=True):
        if target == r or target in r.parents:
            raise EnsembleError(f"--output {out} would replace member {d}; write the ensemble elsewhere")


def _check_alike(dirs: Sequence[Path], configs: Sequence[dict]) -> None:
    """The members must read a text identically and name their outputs the same."""
    for d in dirs:
        if not (d / "tokenizer.json").exists():
            raise EnsembleError(f"{d}: no tokenizer.json (not a model directory the sidecar can serve)")
    for d, config in zip(dirs[1:], configs[1:], strict=True):
        for key in _SAME_CONFIG:
            if config.get(key) != configs[0].get(key):
                raise EnsembleError(f"{d}: {key} differs from {dirs[0]}'s ({config.get(key)!r} against "
                                    f"{configs[0].get(key)!r}); members must share it")
        if (d / "tokenizer.json").read_bytes() != (dirs[0] / "tokenizer.json").read_bytes():
            raise EnsembleError(f"{d}: its tokenizer.json is not {dirs[0]}'s; members must read text the same way")


def _check(staging: Path, members: Sequence[Path], merged: Path, weights: Sequence[float], bias: np.ndarray | None,
           task: str) -> dict:
    """The joined graph against the weighted mean of the members' own logits (+ bias) on the export's fixed
    texts."""
    from trainer.export import check_parity, parity_inputs

    try:
        inputs = parity_inputs(ModelDir.read(staging))
    except ModelDirError as e:
        raise EnsembleError(str(e)) from e
    per_member = [_run(path, inputs) for path in members]
    expected = [sum(w * runs[i] for w, runs in zip(weights, per_member, strict=True)) + (0 if bias is None else bias)
                for i in range(len(per_member[0]))]
    parity = check_parity(merged, inputs, expected, task)
    if not parity.max_abs_diff <= PARITY_TOLERANCE:
        raise EnsembleError(f"{merged}: logits differ from the members' mean by {parity.max_abs_diff:.2e}")
    return {"max_abs_diff": parity.max_abs_diff, "argmax_agreement": parity.argmax_agreement,
            "compared": parity.compared}


def _run(path: Path, inputs) -> list[np.ndarray]:
    import onnxruntime as ort

    from trainer.export import _runs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return [session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)
            for ids, mask in _runs(inputs)]


def file_digest(path: Path) -> str:
    """SHA-256 of a member's graph, recorded so a build can tell whether the member changed since the join."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _report(dirs: Sequence[Path], config: dict, weights: Sequence[float], kinds: Sequence[str],
            parity: dict) -> dict:
    """The labels and task, and per member its weight, architecture and own report (how it was trained)."""
    members = []
    for d, weight in zip(dirs, weights, strict=True):
        results = read_results(d) if (d / "eval_results.json").exists() else {}
        member_config = json.loads((d / "config.json").read_text(encoding="utf-8"))
        members.append({"path": str(d), "weight": round(weight, 6),
                        "sha256": {name: file_digest(d / name) for name in kinds},
                        "config": {k: member_config[k] for k in MEMBER_CONFIG if k in member_config},
                        "results": {k: results[k] for k in MEMBER_RESULTS if k in results}})
    return {"task": config["sidecar_task"], "labels": _labels(config),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": "ensemble of " + ", ".join(str(d) for d in dirs),
            "ensemble": {"members": members, "files": list(kinds), "parity": parity,
                         "how": "one ONNX graph: the members' logits, weighted, summed"}}
