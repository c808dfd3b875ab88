"""``sidecar``: serve Envoy, classify texts offline, or check a config.

    sidecar serve --config router.yaml [--listen 0.0.0.0:50051]
    sidecar classify --config router.yaml "text" | --input texts.jsonl [--output out.jsonl] [--model NAME]
    sidecar check-config router.yaml

Bad configuration, bad model directories and bad input files end with one line on stderr,
``error: <key>: <problem>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from model_contract.model_dir import ModelDirError
from sidecar.app import build_app
from sidecar.config import Config, load_config
from sidecar.decisions import DecisionMaker
from sidecar.errors import ConfigError, ModelLoadError
from sidecar.logs import configure_logging, get_logger

log = get_logger("sidecar.cli")

EXIT_USAGE = 2
DEFAULT_CHUNK = 256
"""Texts handed to the router per call; the engine batches inside each call."""


class InputError(ValueError):
    """A bad ``--input`` file; the message names the file and line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Envoy ext_proc sidecar: route LLM requests by "
                                     "subject, mask or block PII.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server for Envoy (ext_proc), the Classify API and health")
    serve.add_argument("--config", required=True, type=Path, help="YAML config file")
    serve.add_argument("--listen", help="gRPC address, overriding server.listen (e.g. 127.0.0.1:50051)")

    classify = sub.add_parser("classify", help="the serving decision for texts, offline: one JSON line per text")
    classify.add_argument("--config", required=True, type=Path, help="YAML config file")
    classify.add_argument("text", nargs="?", help="one text to classify")
    classify.add_argument("--input", type=Path, help="JSONL file with a 'text' field per line ('-' for stdin)")
    classify.add_argument("--output", type=Path, help="write JSON lines here instead of stdout")
    classify.add_argument("--model", help="the model the client asked for (default: routing.virtual_model)")
    classify.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help=argparse.SUPPRESS)

    check = sub.add_parser("check-config", help="validate a config and load its models; print a summary")
    check.add_argument("config", type=Path, help="YAML config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "classify":
            if (args.text is None) == (args.input is None):
                parser.error("classify needs TEXT or --input FILE (one of them)")
            if args.chunk_size < 1:
                parser.error("--chunk-size must be at least 1")
            return cmd_classify(args)
        return cmd_check_config(args)
    except (ConfigError, ModelLoadError, ModelDirError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _load(path: Path) -> Config:
    config = load_config(path)
    configure_logging(config.logging)
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.server import serve

    config = _load(args.config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, listen=args.listen))
    return 0


def read_texts(path: Path) -> list[str]:
    """Every line's ``text``, in order; blank lines are skipped, anything else missing a text is an error."""
    stream = sys.stdin if str(path) == "-" else None
    try:
        lines = stream.readlines() if stream else path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"--input: {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"--input: {path}: not UTF-8 text") from None
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--input: {path}: line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "text" not in row:
            raise InputError(f"--input: {path}: line {number}: no 'text' field")
        if not isinstance(row["text"], str):
            raise InputError(f"--input: {path}: line {number}: 'text' must be a string")
        texts.append(row["text"])
    return texts


def classify_lines(router: DecisionMaker, texts: list[str], requested_model: str, chunk_size: int) -> Iterator[str]:
    """One JSON line per text, in input order, `chunk_size` texts per batched router call."""
    started = time.perf_counter()
    for i in range(0, len(texts), chunk_size):
        chunk = texts[i:i + chunk_size]
        yield from (d.to_json() for d in router.decide_texts(chunk, requested_model))
        log.info("classify_progress", done=i + len(chunk), total=len(texts),
                 elapsed_s=round(time.perf_counter() - started, 2))


def cmd_classify(args: argparse.Namespace) -> int:
    config = _load(args.config)
    texts = [args.text] if args.input is None else read_texts(args.input)
    app = build_app(config)
    try:
        requested = args.model or config.routing.virtual_model
        with (open(args.output, "w", encoding="utf-8") if args.output else contextlib.nullcontext(sys.stdout)) as out:
            for line in classify_lines(app.decider, texts, requested, args.chunk_size):
                out.write(line + "\n")
    finally:
        app.close()
    return 0


def summary(config: Config, engine_description: dict, path: Path) -> list[str]:
    """What an operator wants to confirm before shipping a config, one fact per line."""
    r, f = config.routing, config.failure
    lines = [f"config: {path} (valid)",
             f"server: grpc {config.server.listen}, metrics {config.server.metrics_listen or 'off'}, "
             f"max message {config.server.max_message_bytes} bytes"]
    for name, info in sorted(engine_description.items()):
        if not info:
            lines.append(f"model {name}: not configured")
            continue
        details = [f"{k}={v}" for k, v in info.items() if k not in ("labels", "entities")]
        if "labels" in info:
            details.append(f"{len(info['labels'])} labels")
        lines.append(f"model {name}: {', '.join(details)}")
    backends = sorted(set(r.categories.values()) | {r.default_model})
    lines.append(f"routing: {len(r.categories)} categories -> {len(backends)} backends ({', '.join(backends)}); "
                 f"default {r.default_model}; threshold {r.confidence_threshold}; virtual model '{r.virtual_model}'")
    policies = ", ".join(f"{m}={p.action}" + (f" (blocks {'/'.join(p.block_entities)})" if p.block_entities else "")
                         for m, p in sorted(config.pii.policies.items())) or "none"
    lines.append(f"pii: default {config.pii.default_policy.action}; per-model {policies}; "
                 f"checksums {'on' if config.pii.checksums else 'off'}, patterns {config.pii.patterns}")
    lines.append(f"failure: inference {f.inference}, timeout {f.timeout_ms:g} ms + {f.timeout_ms_per_kib:g} ms/KiB "
                 f"(at most {f.max_timeout_ms:g} ms), bad body {f.bad_body}, inspect at most {f.max_inspect_bytes} bytes")
    return lines


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    app = build_app(config)
    try:
        print("\n".join(summary(config, app.engine.describe(), args.config)))
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
