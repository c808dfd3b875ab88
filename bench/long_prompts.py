"""Long prompts through the real Envoy with the shipped config and bundled models (the PII guarantee's bench).

Three questions, each answered on this machine and written to bench/results/long_prompts.json:

1. Which is the largest prompt read whole at concurrency 1 within Envoy's message_timeout? Prompts of growing
   size (prose in paragraphs, each line also read alone) with an email, a phone number and a card at the
   very end: each must come back 200 with all three masked (or 403 where the routed backend's policy
   blocks cards: read whole too), or be refused (413/503), never forwarded unmasked.
2. Does one huge request slow the next small ones? The p50 of small requests before, and right after, a
   1 MiB request (and a 512 KiB one, which is inspected or shed rather than refused for its size).
3. How much memory does the sidecar hold? Its RSS idle, after the long prompts, and after a burst of
   concurrent mixed requests.

    .venv/bin/python bench/long_prompts.py [--sizes-kib 1 4 16 ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import FALLBACK_CORPUS, RESULTS, machine, write_json  # noqa: E402
from sidecar_demo.stack import Stack  # noqa: E402

CHAT = "/v1/chat/completions"
PLANTED = {"email": "dana.whitfield@example.org", "phone": "+1 415-555-0142", "card": "4111 1111 1111 1111"}


def post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, float, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, time.perf_counter() - started, response.read()
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - started, e.read()


# Prose in paragraphs of a sentence each: a multi-line prompt is read whole and line by line
# (models.pii.line_windows), the dearer of the two shapes to read.
PARAGRAPHS = FALLBACK_CORPUS.replace(". ", ".\n\n")


def prompt(n_bytes: int) -> bytes:
    tail = f"\n\nContact me at {PLANTED['email']} or {PLANTED['phone']}; card {PLANTED['card']}."
    filler = (PARAGRAPHS * (n_bytes // len(PARAGRAPHS) + 1))[: max(n_bytes - len(tail), 0)]
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": filler + tail}]}).encode()


def small(i: int) -> bytes:
    return json.dumps({"model": "general", "messages": [
        {"role": "user", "content": f"Question {i}: what is the derivative of x^{i % 7 + 2}?"}]}).encode()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def leaked(stack: Stack) -> list[str]:
    found = []
    for got in stack.received():
        body = got.body.decode("utf-8", "replace")
        found += [name for name, value in PLANTED.items() if value in body]
    return found


def long_prompts(stack: Stack, sizes_kib: list[int]) -> list[dict]:
    rows = []
    for kib in sizes_kib:
        stack.clear_received()
        status, seconds, answer = post(stack.url + CHAT, prompt(kib * 1024))
        row = {"kib": kib, "status": status, "ms": round(seconds * 1000, 1), "leaked": leaked(stack)}
        if status != 200:
            row["code"] = json.loads(answer)["error"]["code"] if answer.startswith(b"{") else answer[:60].decode()
        rows.append(row)
        print(f"  {kib:5d} KiB: {status} in {row['ms']:8.1f} ms {row.get('code', '')} leaked={row['leaked']}",
              flush=True)
    return rows


def small_p50(stack: Stack, count: int) -> float:
    times = [post(stack.url + CHAT, small(i))[1] for i in range(count)]
    return round(statistics.median(times) * 1000, 2)


def after_big(stack: Stack, big_kib: int, count: int) -> dict:
    """Send one big request and, while it is still being handled, `count` small ones one after another."""
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(post, stack.url + CHAT, prompt(big_kib * 1024))
        time.sleep(0.05)  # let the big body reach the sidecar first (a bench, not a test)
        times = []
        for i in range(count):
            status, seconds, _ = post(stack.url + CHAT, small(i))
            times.append(seconds)
        big_status, big_seconds, _ = big.result()
    return {"big_kib": big_kib, "big_status": big_status, "big_ms": round(big_seconds * 1000, 1),
            "small_p50_ms": round(statistics.median(times) * 1000, 2),
            "small_max_ms": round(max(times) * 1000, 2)}


def burst(stack: Stack, clients: int, requests: int) -> dict:
    sizes = [200, 2_000, 20_000, 60_000]
    bodies = [prompt(sizes[i % len(sizes)]) for i in range(requests)]
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda b: post(stack.url + CHAT, b)[0], bodies))
    return {"clients": clients, "requests": requests,
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-kib", type=int, nargs="+", default=[1, 4, 16, 32, 64, 96, 128, 192, 256, 512])
    p.add_argument("--small", type=int, default=30, help="small requests per latency measurement")
    p.add_argument("--big-kib", type=int, nargs="*", default=[512, 1024], help="the big requests small ones follow")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients in the burst")
    p.add_argument("--burst", type=int, default=640, help="requests in the burst")
    p.add_argument("--out", type=Path, default=RESULTS / "long_prompts.json")
    args = p.parse_args(argv)
    result: dict = {"machine": machine()}
    with Stack(ready_timeout_s=180) as stack:
        pid = stack.processes()["sidecar"]
        result["rss_mib"] = {"idle": rss_mib(pid)}
        print("long prompts at concurrency 1:", flush=True)
        result["long_prompts"] = long_prompts(stack, args.sizes_kib)
        whole = [r["kib"] for r in result["long_prompts"] if r["status"] in (200, 403) and not r["leaked"]]
        result["largest_read_whole_kib"] = max(whole, default=0)
        result["rss_mib"]["after_long_prompts"] = rss_mib(pid)
        result["small_p50_ms_before"] = small_p50(stack, args.small)
        result["after_big"] = [after_big(stack, kib, args.small) for kib in args.big_kib]
        result["small_p50_ms_after"] = small_p50(stack, args.small)
        stack.clear_received()
        result["burst"] = burst(stack, args.clients, args.burst)
        result["burst"]["leaked"] = leaked(stack)
        result["rss_mib"]["after_burst"] = rss_mib(pid)
        result["leaked_anywhere"] = any(r["leaked"] for r in result["long_prompts"]) or bool(result["burst"]["leaked"])
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
