"""A model directory of any ModernBERT size with random weights, for timing bigger models than the
bundled ones (on a GPU, say) without training them.

The labels, task, special tokens and tokenizer come from an existing model directory (``--like``), so the
sidecar and the bench scripts load the result exactly like a trained model; only the weights are random,
so its timings are real and its predictions meaningless.

    python bench/make_model.py /tmp/pii-base --like models/pii --size base
    python bench/inference.py /tmp/pii-base --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable like under `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DEFAULT_MODELS, log
from model_contract.tasks import get_task  # noqa: E402

# Hidden, intermediate, layers, heads: ModernBERT-base and -large as published, and our own two sizes.
SIZES = {
    "tiny": (64, 96, 2, 2),
    "small": (256, 384, 4, 4),
    "base": (768, 1152, 22, 12),
    "large": (1024, 2624, 28, 16),
}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", type=Path, help="the model directory to write")
    p.add_argument("--like", type=Path, default=DEFAULT_MODELS[1], help="take labels, task and tokenizer from here")
    p.add_argument("--size", choices=list(SIZES), default="base")
    p.add_argument("--max-position-embeddings", type=int, default=512)
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (CPU)")
    p.add_argument("--no-export", action="store_true", help="PyTorch weights only, no ONNX")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_model(output: Path, like: Path, size: str, max_positions: int = 512, seed: int = 0) -> Path:
    """Write the random model and the tokenizer of `like` to `output`."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        ModernBertConfig,
    )

    source = json.loads((like / "config.json").read_text(encoding="utf-8"))
    task = source.get("sidecar_task") or ("pii" if "TokenClassification" in source["architectures"][0] else "category")
    hidden, intermediate, layers, heads = SIZES[size]
    config = ModernBertConfig(
        vocab_size=source["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
        pad_token_id=source["pad_token_id"], bos_token_id=source.get("bos_token_id", source["cls_token_id"]),
        eos_token_id=source.get("eos_token_id", source["sep_token_id"]), cls_token_id=source["cls_token_id"],
        sep_token_id=source["sep_token_id"], classifier_pooling=source.get("classifier_pooling", "mean"),
        id2label={int(k): v for k, v in source["id2label"].items()}, label2id=source["label2id"],
    )
    config.sidecar_task = task
    auto = AutoModelForSequenceClassification if get_task(task).head == "sequence" else AutoModelForTokenClassification
    torch.manual_seed(seed)
    model = auto.from_config(config)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    for name in TOKENIZER_FILES:
        if (like / name).is_file():
            shutil.copy2(like / name, output / name)
    params = sum(p.numel() for p in model.parameters())
    log(f"wrote {output}: {task}, {size} ({layers} layers, hidden {hidden}), {params / 1e6:.1f}M parameters")
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    make_model(args.output, args.like, args.size, args.max_position_embeddings, args.seed)
    if not args.no_export:
        from trainer.export import export_model_dir

        # Random weights: INT8 may disagree with fp32 on many argmaxes; the file is for timing only.
        report = export_model_dir(args.output, int8=args.int8, int8_min_agreement=0.0)
        log(f"exported: {report['onnx_file']} (max abs diff vs PyTorch {report['onnx_max_abs_diff']:.2g})"
            + (f", {report['int8_file']}" if args.int8 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
