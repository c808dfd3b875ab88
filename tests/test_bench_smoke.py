"""The bench scripts run end to end on tiny models with minimal settings, so they cannot rot.

These are not timed tests: they check that each script runs and writes the JSON fields the report and
docs/benchmarks.md rely on. The numbers themselves mean nothing on an untrained tiny model.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar_demo.configs import ROUTER_CONFIG
from tests.conftest import make_untrained_model_dir
from tests.factories import category_rows, write_jsonl
from tests.inference_fakes import onnx_copy

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["inference", "naive", "envoy", "report", "loadgen", "make_model", "multitask", "request_path",
           "long_prompts", "pseudonymize", "line_windows"]
CATEGORIES = list(yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8"))["routing"]["categories"])
PII_ROWS = [
    {"text": "Write to john.smith@example.com about the invoice.", "spans": [{"start": 9, "end": 31, "label": "EMAIL_ADDRESS"}]},
    {"text": "Mary Jones called from 415 555 0100 yesterday.",
     "spans": [{"start": 0, "end": 10, "label": "PERSON"}, {"start": 23, "end": 35, "label": "PHONE_NUMBER"}]},
]


def run(script: str, *args: str) -> None:
    """A bench script's main() in this process (its command line is covered by the --help test)."""
    module = importlib.import_module(f"bench.{script}")
    assert module.main(list(args)) == 0


@pytest.fixture(scope="module")
def models(tiny_base, tiny_pii_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained models: PII with weights, fp32 and INT8 ONNX (every file a full build has); category
    with weights only (the bench must cope with a missing file) and router.yaml's labels, so the shipped
    routing table loads unchanged."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = tmp_path_factory.mktemp("bench_models")
    pii = shutil.copytree(onnx_copy(tiny_pii_dir, tmp_path_factory.getbasetemp()), root / "pii")
    quantize_dynamic(pii / "model.onnx", pii / "model.int8.onnx", weight_type=QuantType.QInt8)
    category = make_untrained_model_dir(tiny_base, root / "category", "category", CATEGORIES)
    return {"category": category, "pii": pii}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_data")
    rows = [{"text": r["text"], "label": CATEGORIES[i % len(CATEGORIES)]} for i, r in enumerate(category_rows(4))]
    return {"category": write_jsonl(root / "category.jsonl", rows), "pii": write_jsonl(root / "pii.jsonl", PII_ROWS)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_results")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_from_the_command_line_and_explains_itself(script):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--help"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0 and "usage" in out.stdout, out.stderr[-2000:]


def test_inference_times_floor_and_engine_and_checks_int8_accuracy(models, data, results):
    run("inference", str(models["category"]), str(models["pii"]), "--lengths", "16,32", "--batches", "1,2",
        "--min-time", "0", "--min-reps", "1", "--full-models", str(results / "none"),
        "--category-data", str(data["category"]), "--pii-data", str(data["pii"]), "--corpus",
        "--out", str(results / "inference.json"), "--plot", str(results / "inference.png"))
    doc = json.loads((results / "inference.json").read_text())
    assert {"machine", "contended", "settings", "models", "accuracy", "summary"} <= doc.keys()
    assert {"cpu", "cores"} <= doc["machine"].keys()
    kinds = {m["task"]: {(r["path"], r["runtime"]) for r in m["rows"]} for m in doc["models"]}
    assert kinds["pii"] == {("floor", "onnx-int8"), ("floor", "onnx"), ("floor", "torch"), ("engine", "onnx-int8")}
    assert kinds["category"] == {("floor", "torch"), ("engine", "torch")}
    assert set(doc["models"][0]["skipped"]) == {"onnx-int8", "onnx"}
    for model in doc["models"]:
        engine = [r for r in model["rows"] if r["path"] == "engine"]
        assert len(engine) == 4 and all(r["ratio_to_floor"] > 0 and r["passes_per_call"] >= 1 for r in engine)
        assert model["single_request_passes"]["short"]["passes"] == 1
        assert model["padding"]["planned_padded_per_real"] >= 1
    assert doc["accuracy"]["category"]["metrics"].keys() == {"torch"}
    acc = doc["accuracy"]["pii"]
    assert acc["metrics"].keys() == {"onnx", "onnx-int8", "torch"}
    assert isinstance(acc["int8_within_1_point"], bool)
    assert doc["summary"]["engine_to_floor_median"] > 0
    assert (results / "inference.png").stat().st_size > 0


def test_naive_compares_pipelines_with_the_engine(models, results):
    run("naive", "--category", str(models["category"]), "--pii", str(models["pii"]), "--concurrency", "1,2",
        "--min-time", "0.2", "--texts", "4", "--corpus", "--pii-corpus",
        "--out", str(results / "naive.json"), "--plot", str(results / "naive.png"))
    doc = json.loads((results / "naive.json").read_text())
    assert [r["concurrency"] for r in doc["rows"]] == [1, 2]
    for row in doc["rows"]:
        assert row["naive"]["requests"] > 0 and row["ours"]["requests"] > 0 and row["ratio"] > 0
    assert doc["check"]["passes_per_request"] == {"category": 1.0, "pii": 1.0}


def test_naive_runs_one_pipeline_per_member_of_an_ensemble(models, results, tmp_path):
    from trainer.ensemble import build_ensemble

    members = [shutil.copytree(models["pii"], tmp_path / name) for name in ("a", "b")]
    ensemble = tmp_path / "pii"
    build_ensemble(members, ensemble)
    out = results / "naive-ensemble.json"
    args = ["--category", str(models["category"]), "--pii", str(ensemble), "--concurrency", "1", "--min-time", "0.1",
            "--texts", "2", "--corpus", "--pii-corpus", "--out", str(out), "--plot", ""]
    run("naive", *args)
    doc = json.loads(out.read_text())
    assert doc["settings"]["naive"]["pii"] == [str(m) for m in members]
    assert "one per member of the PII ensemble (2)" in doc["settings"]["naive"]["how"]
    assert doc["settings"]["full_build_is_shipped"]["pii"] is True
    assert doc["check"]["passes_per_request"]["pii"] == 1.0  # the joined graph: both members in one pass
    (members[1] / "model.int8.onnx").write_bytes((members[0] / "model.onnx").read_bytes())  # retrained after the join
    run("naive", *args)
    assert json.loads(out.read_text())["settings"]["full_build_is_shipped"]["pii"] is False
    (members[1] / "model.safetensors").unlink()
    run("naive", *args)
    assert "no PyTorch weights for pii" in json.loads(out.read_text())["skipped"]


@pytest.mark.envoy
def test_envoy_runs_all_three_cases_through_the_real_envoy(models, results):
    run("envoy", "--category", str(models["category"]), "--pii", str(models["pii"]), "--concurrency", "2",
        "--duration", "1", "--rounds", "2", "--warmup", "0", "--requests", "4", "--corpus", "--pii-corpus",
        "--out", str(results / "envoy.json"), "--plot", str(results / "envoy.png"))
    doc = json.loads((results / "envoy.json").read_text())
    assert list(doc["cases"]) == ["direct", "noop", "models"]
    for case in doc["cases"].values():
        [row] = case["rows"]
        assert row["requests"] > 0 and row["errors"] == 0 and len(row["runs"]) == 2
        assert {"rps", "p50_ms", "p99_ms", "cpu_ms_per_request"} <= row.keys()
    models_row = doc["cases"]["models"]["rows"][0]
    assert models_row["sidecar"]["category"]["passes"] > 0 and models_row["sidecar"]["pii"]["passes"] > 0
    assert "protocol_overhead_p50_ms" in doc["summary"]["per_concurrency"]["2"]
    assert doc["request_floor"] == {"skipped": "category: not an ONNX model"}  # the tiny category model is PyTorch


def test_request_path_times_the_sidecars_own_work_per_request(results):
    run("request_path", "--requests", "20", "--rounds", "2", "--corpus", "--pii-corpus",
        "--out", str(results / "request_path.json"))
    doc = json.loads((results / "request_path.json").read_text())
    assert doc["us_per_request"] > 0 and len(doc["rounds_us"]) == 2
    assert doc["machine"]["speed_probe_ms"] > 0 and "callgrind" not in doc


@pytest.mark.envoy
def test_long_prompts_reads_prompts_whole_or_refuses_them_and_nothing_leaks(results):
    """Through the shipped stack and bundled models: the planted values never reach a backend, whatever the
    size, and each phase is recorded."""
    run("long_prompts", "--sizes-kib", "1", "8", "--small", "3", "--big-kib", "1024", "--clients", "4",
        "--burst", "8", "--out", str(results / "long_prompts.json"))
    doc = json.loads((results / "long_prompts.json").read_text())
    assert [r["kib"] for r in doc["long_prompts"]] == [1, 8] and doc["long_prompts"][0]["status"] == 200
    assert doc["leaked_anywhere"] is False and doc["largest_read_whole_kib"] >= 1
    assert doc["after_big"][0]["big_status"] == 413 and sum(doc["burst"]["statuses"].values()) == 8
    assert doc["rss_mib"]["idle"] > 0


def test_line_windows_times_both_settings_and_counts_the_extra_windows(models, results):
    run("line_windows", "--model", str(models["pii"]), "--min-time-s", "0.01", "--min-reps", "1",
        "--out", str(results / "line_windows.json"))
    doc = json.loads((results / "line_windows.json").read_text())
    rows = {r["shape"]: r for r in doc["shapes"]}
    assert rows["one line, 1 KB"]["windows_with_lines"] == rows["one line, 1 KB"]["windows_whole"]
    many = rows["one-character lines, 16 KB"]
    assert many["lines"] > 8000 and 0 < many["line_parts"] <= many["tokens"] // doc["line_tokens"] + 1
    assert many["windows_with_lines"] > many["windows_whole"] and all(r["off_ms"] > 0 < r["on_ms"] for r in rows.values())


def test_pseudonymize_restores_every_answer_through_envoy_and_reports_the_cost(results):
    run("pseudonymize", "--requests", "6", "--clients", "2", "--out", str(results / "pseudonymize.json"))
    doc = json.loads((results / "pseudonymize.json").read_text())
    envoy = doc["through_envoy"]
    for kind in ("json", "stream"):
        assert envoy["pseudonymize"][kind]["ok"] == envoy["mask"][kind]["ok"] == 6
        assert envoy["pseudonymize"][kind]["answers_with_values"] == 6  # the values came back
        assert envoy["mask"][kind]["answers_with_values"] == 0  # masked: the backend never had them
    assert envoy["stream_events_per_answer"] > 10 and doc["restoring"]["us_per_sse_event"] > 0


def test_a_full_build_counts_as_the_shipped_model_only_with_the_same_int8_file(tmp_path):
    from bench.common import full_build_matches

    shipped, full = tmp_path / "models" / "pii", tmp_path / "build" / "pii"
    for d, data in ((shipped, b"weights"), (full, b"weights")):
        d.mkdir(parents=True)
        (d / "model.int8.onnx").write_bytes(data)
    assert full_build_matches(shipped, full.parent) is True
    (full / "model.int8.onnx").write_bytes(b"other weights")
    assert full_build_matches(shipped, full.parent) is False
    assert full_build_matches(shipped, tmp_path / "nowhere") is None


def test_an_envoy_row_is_the_run_with_the_median_latency_and_keeps_every_run():
    from bench.envoy import median_row

    runs = [{"rps": rps, "p50_ms": p50, "p99_ms": p50 * 2} for rps, p50 in ((500, 2.0), (900, 1.1), (300, 3.5))]
    row = median_row(runs)
    assert (row["rps"], row["p50_ms"], row["p99_ms"]) == (500, 2.0, 4.0)
    assert [r["p50_ms"] for r in row["runs"]] == [2.0, 1.1, 3.5]


@pytest.mark.slow
def test_multitask_trains_one_encoder_with_both_heads_and_compares_it(tiny_base, tmp_path):
    from model_contract.model_dir import ModelDir

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": r["text"], "label": r["label"]} for r in category_rows(3)]
    for split in ("train", "val"):
        write_jsonl(data / f"category_{split}.jsonl", rows)
        for source in ("synth", "presidio"):
            write_jsonl(data / f"{source}_{split}.jsonl", PII_ROWS)
        write_jsonl(data / f"clean_{split}.jsonl", [{"text": r["text"], "spans": []} for r in rows[:3]])
    single = tmp_path / "single" / "pii"
    single.mkdir(parents=True)
    (single / "eval_results.json").write_text(json.dumps({"metrics": {"entity_f1": 0.5, "f1": 0.5}}))
    run("multitask", "--encoder", str(tiny_base), "--data", str(data), "--single", str(single.parent), "--max-steps", "2",
        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "multitask.json"))
    doc = json.loads((tmp_path / "multitask.json").read_text())
    assert doc["training"]["steps"] == 2 and doc["data"]["category_train"] == len(rows)
    assert {"accuracy", "f1"} <= doc["shared"]["category"].keys() and "entity_f1" in doc["shared"]["pii"]
    assert list(doc["compare"]) == ["pii"] and doc["keeps_accuracy"] in (True, False)  # no category model given
    assert 0 < doc["inference"]["share_saved"] < 1
    for task in ("category", "pii"):
        assert ModelDir.read(tmp_path / "work" / task).task == task


def test_report_writes_the_summary_table_from_the_recorded_results(tmp_path):
    for recorded in (ROOT / "bench" / "results").glob("*.json"):  # its own input: no other test's output
        shutil.copy(recorded, tmp_path / recorded.name)
    run("report", "--results", str(tmp_path))
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("## Benchmarks") and "cores" in text and "| target |" in text


def test_make_model_builds_a_bigger_model_the_sidecar_can_read(models, tmp_path):
    from model_contract.model_dir import ModelDir

    run("make_model", str(tmp_path / "big"), "--like", str(models["pii"]), "--size", "small", "--no-export")
    made = ModelDir.read(tmp_path / "big")
    assert made.task == "pii" and made.labels == ModelDir.read(models["pii"]).labels and made.has_torch_weights
    assert json.loads((tmp_path / "big" / "config.json").read_text())["num_hidden_layers"] == 4


def test_interleaved_timing_takes_turns_and_leaves_each_turns_first_call_untimed():
    from bench.common import interleaved

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("floor", "engine")}
    timed = interleaved(fns, min_time_s=0.0, min_reps=6, rounds=3)
    assert calls == (["floor"] * 3 + ["engine"] * 3) * 3  # per turn: one untimed call, then two timed
    assert {name: (t["reps"], t["calls"]) for name, t in timed.items()} == {"floor": (6, 9), "engine": (6, 9)}


def test_ab_hands_both_trees_the_same_request_texts_from_this_checkout(tmp_path, monkeypatch):
    """An earlier commit's worktree has no build/ of its own: left to its defaults it benches other texts."""
    from bench import ab

    seen: dict[str, list[str]] = {}

    def run_in(tree, script, args, out):
        seen[f"{tree.name}/{script}"] = args
        if script == "request_path.py":
            return {"callgrind": {"instructions_per_request": 1}, "us_per_request": 1.0}
        per = {"1": {"protocol_overhead_p50_ms": 1.0, "direct_rps": 1.0, "noop_rps": 1.0}}
        return {"summary": {"per_concurrency": per, "noop_peak_rps": 1.0}, "settings": {}}

    monkeypatch.setattr(ab, "run_in", run_in)
    for name in ("before", "after"):
        ab.measure(tmp_path / name, tmp_path, name)
    corpus = [str(ab.DATA / "category_val.jsonl"), str(ab.DATA / "synth_val.jsonl")]
    for script in ("request_path.py", "envoy.py"):
        before, after = seen[f"before/{script}"], seen[f"after/{script}"]
        assert before == after
        assert [before[before.index(flag) + 1] for flag in ("--corpus", "--pii-corpus")] == corpus
