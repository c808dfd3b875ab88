"""What reading each line alone costs (`models.pii.line_windows`): the PII model's engine time per text with
line windows on against off, on texts of several shapes, timed in turns.

A one-line text is read once either way; a multi-line one is read whole and line by line (a line under
`LINE_TOKENS` tokens with the lines after it), so its cost grows with its lines. The shapes: ordinary
prompts (one line, a short chat message, paragraphs of prose) and the worst a client can choose: 16 KB of
one-word or one-character lines, and lines one token longer than a window (each needs two windows alone).
The accuracy this buys is in the PII model's card (any position).

    .venv/bin/python bench/line_windows.py [--model models/pii] [--min-time-s 1.5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    DATA,
    DEFAULT_MODELS,
    RESULTS,
    corpus_texts,
    interleaved,
    machine,
    texts_of_length,
    write_json,
)
from model_contract.model_dir import ModelDir  # noqa: E402
from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig  # noqa: E402
from sidecar.inference.engine import Engine  # noqa: E402
from sidecar.inference.windows import LINE_TOKENS, TextEncoder  # noqa: E402


def paragraphs(corpus: list[str], chars: int, sep: str) -> str:
    """Texts of the corpus (its sentences, when it is one text) joined by `sep` up to `chars` characters."""
    pieces = corpus if len(corpus) > 1 else [s.strip() + "." for s in corpus[0].split(". ") if s.strip()]
    out: list[str] = []
    size = 0
    while size < chars:
        out.append(pieces[len(out) % len(pieces)].replace("\n", " "))
        size += len(out[-1]) + len(sep)
    return sep.join(out)[:chars]


def shapes(corpus: list[str], model: Path, encoder: TextEncoder) -> dict[str, str]:
    body = encoder.body + 1  # one token over a window: each such line alone needs two
    tokenizer = ModelDir.read(model).load_tokenizer()
    tokenizer.no_truncation()
    tokenizer.no_padding()
    prose = [t.replace("\n", " ") for t in corpus]
    return {
        "one line, 1 KB": paragraphs(corpus, 1024, " "),
        "chat message, 3 lines": "Hi, I need help with my order.\nThe parcel never arrived and tracking shows "
                                 "nothing.\nThanks, Anna",
        "paragraphs, 2 KB": paragraphs(corpus, 2048, "\n\n"),
        "paragraphs, 8 KB": paragraphs(corpus, 8192, "\n\n"),
        "one line, 8 KB": paragraphs(corpus, 8192, " "),
        "one-word lines, 16 KB": "word\n" * (16384 // 5),
        "one-character lines, 16 KB": "a\n" * 8192,
        f"lines of {body} tokens, 16 KB": "\n".join(texts_of_length(tokenizer, prose, body, 16384 // (6 * body) + 1)),
    }


def engine(model: Path, line_windows: bool) -> Engine:
    return Engine.load(ModelsConfig(pii=ModelConfig(path=str(model), line_windows=line_windows)), BatchingConfig())


def measure(model: Path, encoder: TextEncoder, texts: dict[str, str], min_time_s: float, min_reps: int) -> list[dict]:
    off, on = engine(model, False), engine(model, True)
    try:
        rows = []
        for name, text in texts.items():
            encoded = encoder.encode(text)
            parts = encoder.parts(text, encoded)
            times = interleaved({"off": lambda t=text: off.detect_pii_many([t]),
                                 "on": lambda t=text: on.detect_pii_many([t])}, min_time_s, min_reps)
            rows.append({
                "shape": name, "chars": len(text), "tokens": len(encoded), "lines": text.count("\n") + 1,
                "line_parts": len(parts) - 1,
                "windows_whole": len(parts[0].windows), "windows_with_lines": sum(len(p.windows) for p in parts),
                "off_ms": round(times["off"]["median_ms"], 2), "on_ms": round(times["on"]["median_ms"], 2),
                "ratio": round(times["on"]["median_ms"] / times["off"]["median_ms"], 2),
                "runs": times,
            })
            print(f"{name:28} {rows[-1]['tokens']:6} tokens  off {rows[-1]['off_ms']:8.2f} ms  "
                  f"on {rows[-1]['on_ms']:8.2f} ms  x{rows[-1]['ratio']:.2f}", flush=True)
        return rows
    finally:
        off.close()
        on.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODELS[1], help="the PII model directory")
    p.add_argument("--corpus", type=Path, nargs="*", default=[DATA / "clean_val.jsonl"],
                   help="prose to build the texts from (default: the PII-free exam questions of make models; "
                        "without them, the bench's own prose)")
    p.add_argument("--min-time-s", type=float, default=1.5, help="seconds per shape and setting")
    p.add_argument("--min-reps", type=int, default=9)
    p.add_argument("--out", type=Path, default=RESULTS / "line_windows.json")
    args = p.parse_args(argv)
    corpus = corpus_texts(args.corpus)
    encoder = TextEncoder.for_model(ModelDir.read(args.model), None, None, line_windows=True)  # as the engine reads
    result = {"machine": machine(), "bench": "line_windows", "model": str(args.model), "line_tokens": LINE_TOKENS,
              "how": "Engine.detect_pii_many on one text (INT8 on this CPU), line_windows off and on in turns",
              "shapes": measure(args.model, encoder, shapes(corpus, args.model, encoder), args.min_time_s, args.min_reps)}
    print(json.dumps([{k: v for k, v in r.items() if k != "runs"} for r in result["shapes"]], indent=1))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
