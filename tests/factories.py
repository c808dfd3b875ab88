"""Small data the tests make for themselves (the real data in ../shared is for training and benchmarks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORY_TEMPLATES = {
    "math": ["Solve for x: {a}x + {b} = {c}.", "What is the derivative of x^{a} at x = {b}?",
             "Compute the integral of {a}x dx from 0 to {b}.", "Find the sum of the first {a} primes."],
    "law": ["Is a contract signed under duress by party {a} enforceable?", "The defendant in case {a} appealed the verdict.",
            "Which court hears appeals about statute {a}?", "Can a tenant sue the landlord after {a} days of notice?"],
    "biology": ["Which organelle makes ATP in cell type {a}?", "How many chromosomes does species {a} carry?",
                "Describe enzyme {a} in photosynthesis.", "What does gene {a} encode in bacteria?"],
}

CORPUS_LINES = [
    "My name is John Smith and my email is john.smith@example.com.",
    "Call me at +1 415 555 0100 or write to 12 Baker Street, London.",
    "The card 4111 1111 1111 1111 expires next year; IBAN GB82 WEST 1234 5698 7654 32.",
    "我的名字是张伟，电话13800138000，住在北京市朝阳区。",
    "Solve for x when 3x + 5 = 11, then integrate the result.",
    "The court held that the contract was void for lack of consideration.",
    "Mitochondria produce ATP through oxidative phosphorylation.",
]


def category_rows(n_per_label: int = 20, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, templates in CATEGORY_TEMPLATES.items():
        for i in range(n_per_label):
            t = templates[i % len(templates)]
            rows.append({"text": t.format(a=rng.randint(2, 99), b=rng.randint(2, 99), c=rng.randint(2, 99)), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus_file(path: Path) -> Path:
    lines = CORPUS_LINES * 3 + [r["text"] for r in category_rows(10)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def luhn_card(rng: random.Random) -> str:
    """A 16-digit Visa-range number that passes Luhn."""
    from sidecar.checksums import is_valid_card

    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = sum(d if i % 2 else (2 * d if 2 * d < 10 else 2 * d - 9) for i, d in enumerate(reversed(digits)))
    number = "".join(map(str, digits)) + str((10 - total % 10) % 10)
    assert is_valid_card(number)
    return number


def gb_iban(rng: random.Random) -> str:
    """A UK IBAN with valid mod-97 check digits."""
    from sidecar.checksums import is_valid_iban

    bban = "WEST" + "".join(str(rng.randrange(10)) for _ in range(14))
    numeric = "".join(str(int(c, 36)) for c in bban + "GB00")
    iban = f"GB{98 - int(numeric) % 97:02d}{bban}"
    assert is_valid_iban(iban)
    return iban
