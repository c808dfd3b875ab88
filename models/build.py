"""Reproduce the bundled default models (`make models`).

Offline, from our own `trainer` and the shared data beside the checkout:
  1. hold out validation splits (category: stratified 10% of MMLU-Pro; PII: 10% of the Presidio set plus a
     synthetic set drawn with another seed);
  2. `trainer base --size small` on the training texts, then `trainer pretrain` (masked-LM) on them;
  3. `trainer category` and `trainer pii` from that encoder, exported to INT8 ONNX;
  4. the yardsticks: a TF-IDF + logistic-regression baseline on the same category rows, and the PII catch
     rate measured through the sidecar's own engine (an entity is caught when all its characters are masked);
  5. copy what the sidecar serves (config, tokenizer, INT8 ONNX, eval report, card) into `models/`.

Every step writes under `--work` and is skipped when its output already exists, so an interrupted run
resumes where it stopped. Validation data is never used for the tokenizer or pretraining.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import datasets  # noqa: E402
from models.datasets import SPLITS, read_jsonl, write_jsonl  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SHIPPED = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "model.int8.onnx", "eval_results.json", "README.md"]


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "trainer", *args], check=True)


def split_data(data: Path, work: Path, synth_train: int, synth_val: int) -> dict[str, Path]:
    """Every split and derived set (models/datasets.py), written once under `work/data`."""
    d = work / "data"
    paths = {name: d / f"{name}.jsonl" for name in SPLITS}
    if all(p.exists() for p in paths.values()):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("synth_train", synth_train, "1"), ("synth_val", synth_val, "2")):
        if not paths[name].exists():
            run("synth-pii", "--count", str(count), "--seed", seed, "--output", str(paths[name]))
    category_train, category_dev, category_val = datasets.category_rows(data)
    pii = datasets.pii_rows(data, read_jsonl(paths["synth_train"]), read_jsonl(paths["synth_val"]),
                            category_train, category_val)
    sets = {"category_train": category_train, "category_dev": category_dev, "category_val": category_val,
            "everyday_val": read_jsonl(datasets.EVERYDAY_EVAL), **pii}
    sets["corpus"] = [{"text": r["text"]} for r in category_train + pii["wnut_train"] + pii["context_train"]]
    sets["corpus"] += [{"text": r.get("full_text", r.get("text"))} for r in pii["presidio_train"]]
    sets["corpus"] += [{"text": r["text"]} for r in read_jsonl(paths["synth_train"])]
    for name, rows in sets.items():
        write_jsonl(paths[name], rows)
    return paths


def tfidf_baseline(train: Path, val: Path) -> dict:
    """The yardstick the category model must beat, fitted on exactly its training rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    tr, va = read_jsonl(train), read_jsonl(val)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x_tr = vec.fit_transform([r["text"] for r in tr])
    clf = LogisticRegression(C=10, max_iter=2000).fit(x_tr, [r["label"] for r in tr])
    pred = clf.predict(vec.transform([r["text"] for r in va]))
    gold = [r["label"] for r in va]
    return {"model": "TF-IDF (1-2 grams) + logistic regression (C=10)", "train_rows": len(tr),
            "validation_rows": len(va), "accuracy": round(float(accuracy_score(gold, pred)), 4),
            "f1_weighted": round(float(f1_score(gold, pred, average="weighted")), 4)}


def served_accuracy(model_dir: Path, val: Path) -> tuple[dict, dict]:
    """Category accuracy through the sidecar's engine for each ONNX runtime, and how the router's
    confidence threshold trades coverage for accuracy (INT8, the CPU default)."""
    import numpy as np
    from sklearn.metrics import f1_score

    from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig
    from sidecar.inference.engine import Engine

    rows = read_jsonl(val)
    texts, gold = [r["text"] for r in rows], [r["label"] for r in rows]
    report, by_threshold = {}, {}
    for runtime in ("onnx", "onnx-int8"):
        engine = Engine.load(ModelsConfig(category=ModelConfig(path=str(model_dir), runtime=runtime)),
                             BatchingConfig(), checksums=False)
        try:
            results = engine.classify_many(texts)
        finally:
            engine.close()
        pred = [r.label for r in results]
        report[runtime] = {"accuracy": round(float(np.mean([p == g for p, g in zip(pred, gold, strict=True)])), 4),
                           "f1_weighted": round(float(f1_score(gold, pred, average="weighted")), 4)}
        if runtime == "onnx-int8":
            for t in (0.0, 0.3, 0.4, 0.5, 0.6):
                kept = [p == g for p, g, r in zip(pred, gold, results, strict=True) if r.confidence >= t]
                by_threshold[str(t)] = {"coverage": round(len(kept) / len(rows), 4),
                                        "accuracy": round(float(np.mean(kept)) if kept else 0.0, 4)}
    return report, by_threshold


def gold_spans(row: dict) -> tuple[str, list[tuple[int, int, str]]]:
    if "full_text" in row:
        return row["full_text"], [(s["start_position"], s["end_position"], s["entity_type"]) for s in row["spans"]]
    return row["text"], [(s["start"], s["end"], s["label"]) for s in row["spans"]]


async def _detect(model_dir: Path, texts: list[str], checksums: bool) -> list[list]:
    """Spans the sidecar would mask under its default policy (score threshold included)."""
    from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig, PiiPolicyConfig
    from sidecar.inference.engine import Engine

    threshold = PiiPolicyConfig().score_threshold
    engine = Engine.load(ModelsConfig(pii=ModelConfig(path=str(model_dir))), BatchingConfig(), checksums=checksums)
    try:
        out = []
        for i in range(0, len(texts), 64):
            results = await asyncio.gather(*(engine.detect_pii(t) for t in texts[i:i + 64]))
            out.extend([s for s in r.spans if s.score >= threshold] for r in results)
        return out
    finally:
        engine.close()


def catch_rate(model_dir: Path, sources: dict[str, Path]) -> dict:
    """Both as served (model + checksum recognizers) and for the model alone."""
    return {"served": _catch_rate(model_dir, sources, checksums=True),
            "model_only": _catch_rate(model_dir, sources, checksums=False)}


def false_masks(model_dir: Path, clean: Path) -> dict:
    """On ordinary exam questions (no PII labelled): how often the served model masks anything at all."""
    texts = [r["text"] for r in read_jsonl(clean)]
    spans = asyncio.run(_detect(model_dir, texts, checksums=True))
    chars = sum(len(t) for t in texts)
    masked = sum(s.end - s.start for found in spans for s in found)
    return {"texts": len(texts), "texts_with_a_mask": round(sum(bool(f) for f in spans) / len(texts), 4),
            "spans_per_text": round(sum(len(f) for f in spans) / len(texts), 4),
            "masked_char_share": round(masked / max(chars, 1), 4)}


def _catch_rate(model_dir: Path, sources: dict[str, Path], checksums: bool) -> dict:
    """Per source and entity type: the share of gold entities whose every non-space character is masked,
    and the share of masked characters that lie outside every gold entity (false masks)."""
    report = {}
    for name, path in sources.items():
        rows = [gold_spans(r) for r in read_jsonl(path)]
        predicted = asyncio.run(_detect(model_dir, [t for t, _ in rows], checksums))
        total, caught = Counter(), Counter()
        masked_chars = false_chars = 0
        for (text, gold), spans in zip(rows, predicted, strict=True):
            masked = set()
            for s in spans:
                masked.update(range(s.start, s.end))
            inside = set()
            for start, end, label in gold:
                chars = {i for i in range(start, end) if not text[i].isspace()}
                inside.update(range(start, end))
                total[label] += 1
                caught[label] += chars <= masked
            masked_chars += len({i for i in masked if not text[i].isspace()})
            false_chars += len({i for i in masked - inside if not text[i].isspace()})
        report[name] = {
            "texts": len(rows),
            "entities": sum(total.values()),
            "caught": round(sum(caught.values()) / max(sum(total.values()), 1), 4),
            "false_mask_char_share": round(false_chars / max(masked_chars, 1), 4),
            "per_type": {k: {"entities": total[k], "caught": round(caught[k] / total[k], 4)}
                         for k in sorted(total, key=lambda k: -total[k])},
        }
    return report


def ship(built: Path, target: Path, extra: dict) -> None:
    """Copy what the sidecar serves, with the yardsticks added to the eval report and the card."""
    from trainer.card import write_card

    results = json.loads((built / "eval_results.json").read_text())
    results.update(extra)
    data = results.get("data", {})
    for key in ("train", "validation"):  # paths relative to the checkout, not this machine
        data[key] = [str(Path(f).resolve().relative_to(ROOT)) if Path(f).is_absolute() and
                     Path(f).resolve().is_relative_to(ROOT) else f for f in data.get(key, [])]
    base = Path(results.get("base_model", ""))
    if base.is_absolute() and base.resolve().is_relative_to(ROOT):
        results["base_model"] = str(base.resolve().relative_to(ROOT))
    results["recipe"] = "make models (models/build.py)"
    results.setdefault("notes", []).insert(0, (
        "Built by `make models`: a small ModernBERT (4 layers, hidden 256, 8k byte-level BPE vocabulary) from "
        "`trainer base --size small`, one epoch of `trainer pretrain` (masked-LM) on the training texts, then "
        "this fine-tuning; splits held out from ../shared/data (MMLU-Pro train.jsonl: stratified 10%; Presidio "
        "generated_large.json: 10%, plus a synthetic set drawn with another seed)."))
    (built / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_card(built, results)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in SHIPPED:
        if (built / name).exists():
            shutil.copy2(built / name, target / name)


def category_notes(served: dict, baseline: dict) -> list[str]:
    int8, fp32 = served["onnx-int8"]["accuracy"], served["onnx"]["accuracy"]
    gap = baseline["accuracy"] - int8
    notes = [f"INT8 accuracy {int8:.4f} vs fp32 {fp32:.4f} ({(int8 - fp32) * 100:+.2f} points)."]
    if gap > 0:
        notes.append(
            f"Target missed: {gap * 100:.1f} accuracy points below the TF-IDF baseline ({int8:.4f} vs "
            f"{baseline['accuracy']:.4f}). This is a 4-layer, 256-wide ModernBERT trained from scratch on "
            "about 9k questions on a 2-core CPU (one masked-LM epoch, a few fine-tuning epochs), so it has "
            "no language knowledge beyond those questions. What closes the gap: fine-tune the pretrained "
            "`answerdotai/ModernBERT-base` (`trainer category --base-model answerdotai/ModernBERT-base`) on "
            "a GPU; failing that, longer masked-LM pretraining on more in-domain text and more epochs.")
    else:
        notes.append(
            f"Beats the TF-IDF baseline by {-gap * 100:.1f} accuracy points ({int8:.4f} vs "
            f"{baseline['accuracy']:.4f}), a margin within the noise of a {baseline['validation_rows']}-row "
            "validation set (one standard error is about 1.3 points): call it level with the baseline. "
            "Fine-tuning the pretrained `answerdotai/ModernBERT-base` on a GPU is what moves it clearly ahead.")
    return notes


def pii_notes(catch: dict, clean: dict) -> list[str]:
    notes = [f"On {clean['texts']} held-out exam questions with no PII, {clean['texts_with_a_mask']:.1%} get any "
             f"mask ({clean['spans_per_text']:.2f} spans per question, {clean['masked_char_share']:.2%} of "
             "characters)."]
    for source, r in catch["served"].items():
        weak = [f"{k} {v['caught']:.0%}" for k, v in r["per_type"].items() if v["caught"] < 0.95]
        status = "meets" if r["caught"] >= 0.95 else f"misses by {(0.95 - r['caught']) * 100:.1f} points"
        notes.append(f"{source}: {r['caught']:.1%} of entities caught as served ({status} the 95% target)"
                     + (f"; below 95%: {', '.join(weak)}" if weak else "") + ".")
    notes.append("What closes a gap: fine-tune `answerdotai/ModernBERT-base` on a GPU "
                 "(`trainer pii --base-model answerdotai/ModernBERT-base`), more real-looking training text "
                 "for the weak types, and a lower per-policy score threshold where recall matters more.")
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "models", help="where every step writes")
    p.add_argument("--out", type=Path, default=ROOT / "models", help="where the shipped models go")
    p.add_argument("--synth-train", type=int, default=3000)
    p.add_argument("--synth-val", type=int, default=400)
    p.add_argument("--pretrain-epochs", default="1")
    p.add_argument("--category-epochs", default="2")
    p.add_argument("--pii-epochs", default="2")
    p.add_argument("--only", choices=["category", "pii"], help="build one model")
    args = p.parse_args()
    started = time.time()
    w = args.work
    paths = split_data(args.data, w, args.synth_train, args.synth_val)
    base, encoder = w / "base", w / "encoder"
    if not (base / "config.json").exists():
        run("base", "--size", "small", "--corpus", str(paths["corpus"]), "--output", str(base))
    if not (encoder / "config.json").exists():
        run("pretrain", "--base-model", str(base), "--corpus", str(paths["corpus"]), "--output", str(encoder),
            "--epochs", args.pretrain_epochs, "--batch-size", "32", "--max-length", "128")

    if args.only in (None, "category"):
        cat = w / "category"
        if not (cat / "model.int8.onnx").exists():
            run("category", "--train", str(paths["category_train"]), "--validation", str(paths["category_dev"]),
                "--base-model", str(encoder), "--output", str(cat), "--max-length", "128",
                "--epochs", args.category_epochs, "--batch-size", "32", "--learning-rate", "3e-4",
                "--warmup-ratio", "0.06", "--weight-decay", "0.01", "--eval-steps", "250", "--patience", "4",
                "--int8")
        baseline = tfidf_baseline(paths["category_train"], paths["category_val"])
        served, thresholds = served_accuracy(cat, paths["category_val"])
        notes = category_notes(served, baseline)
        ship(cat, args.out / "category", {"baseline": baseline, "served_accuracy": served,
                                          "confidence_threshold": thresholds, "notes": notes})

    if args.only in (None, "pii"):
        pii = w / "pii"
        if not (pii / "model.int8.onnx").exists():
            run("pii", "--train", *(str(paths[k]) for k in ("synth_train", "presidio_train", "wnut_train",
                                                           "context_train", "clean_train")),
                "--validation", str(paths["synth_val"]),
                "--base-model", str(encoder), "--output", str(pii), "--max-length", "128",
                "--epochs", args.pii_epochs, "--batch-size", "16", "--learning-rate", "5e-4",
                "--warmup-ratio", "0.06", "--weight-decay", "0.01", "--eval-steps", "250", "--patience", "4",
                "--int8")
        catch = catch_rate(pii, {"presidio_validation": paths["presidio_val"], "synthetic_validation": paths["synth_val"]})
        clean = false_masks(pii, paths["clean_val"])
        ship(pii, args.out / "pii", {"catch_rate": catch, "false_masks_on_questions": clean,
                                     "notes": pii_notes(catch, clean)})
    print(json.dumps({"built_in_s": round(time.time() - started)}))


if __name__ == "__main__":
    main()
