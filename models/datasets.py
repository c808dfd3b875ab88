"""The bundled models' data: held-out splits and the derived training sets (`make models`, step 1).

Held out by source or template, never by a row of a shared shape:
  - category: 10% of MMLU-Pro and 10% of MMLU (stratified by label, each file on its own), plus our own
    everyday questions (`models/data/everyday_eval.jsonl`), written apart from the training ones and never
    trained on (`person`: the question names someone, a public figure or an eponym such as Newton's laws;
    only those that name no one count as PII-free);
  - PII: whole Presidio templates (`template_id`), a synthetic set drawn with another seed, and 20% of the
    WNUT-17 sentences (real text: no two rows share a template);
  - any position: held-out PII sentences placed at a random offset inside 1-8 KB of held-out prose.
Derived for training only: chat-style questions cut from the exam rows, short questions around the words
that mark each subject in them ("what's a titration?"), PII rows set at random offsets inside PII-free prose
(so every window offset is seen, as served), and PII-free negatives from real text. The held-out sets draw
their randomness apart from the training sets, so a change to the training rows moves no held-out row.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVERYDAY_TRAIN = HERE / "data" / "everyday_train.jsonl"
EVERYDAY_EVAL = HERE / "data" / "everyday_eval.jsonl"
SPLITS = ("category_train", "category_dev", "category_val", "everyday_val", "presidio_train", "presidio_val", "synth_train",
          "synth_val", "wnut_train", "wnut_val", "context_train", "any_position_val", "clean_train", "clean_val",
          "wnut_clean_val", "corpus")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


# --- category ------------------------------------------------------------------------------------------

def exam_split(rows: list[dict], seed: int = 42, share: float = 0.1) -> tuple[list[dict], list[dict]]:
    from sklearn.model_selection import train_test_split

    rows = [{"text": r["text"], "label": r["label"]} for r in rows]
    return train_test_split(rows, test_size=share, random_state=seed, stratify=[r["label"] for r in rows])


_DROP = re.compile(r"following|statement \d|best describes|_{2,}|\([ivx]+\)|\b[IV]{1,3}\.\s|^[A-J][).]\s", re.I)
_FRAME = re.compile(r"\b(which|what) of the following\b|\bthe following\b|\bstatement \d\b", re.I)
_OPENERS = ("", "", "", "quick question: ", "can you explain ", "help me understand ", "explain ",
            "hey, ", "i'm curious: ", "tell me about ", "what about ", "how come ")


def chat_style(text: str, rng: random.Random) -> str | None:
    """A short question the way people ask an assistant, cut from an exam row: the answer frames and
    options dropped, the subject's words kept. None when nothing usable is left."""
    text = re.sub(r"\s+", " ", text).strip()
    sentences = [s for s in re.split(r"(?<=[.?!])\s+", text) if s]
    kept = [s for s in sentences if not _DROP.search(s)] or [_FRAME.split(sentences[0])[0]]
    words = rng.choice(kept[:3]).split()
    if len(words) < 3:
        return None
    start = rng.randint(0, max(0, len(words) - 18)) if len(words) > 24 else 0
    core = " ".join(words[start:start + rng.randint(6, 18)]).strip(" ,;:.?!")
    opener = rng.choice(_OPENERS)
    if opener and core[:1].isupper() and core[1:2].islower():
        core = core[0].lower() + core[1:]
    out = opener + core + rng.choice(("?", "?", ".", ""))
    return out.lower() if rng.random() < 0.3 else out


_WORD = re.compile(r"[a-z][a-z'-]*[a-z]")
_EXAM_WORDS = frozenset([  # the exam frame, not the subject
    "following", "statement", "statements", "correct", "incorrect", "true", "false", "answer", "answers",
    "best", "likely", "question", "questions", "refers", "information", "passage", "choice", "choices",
    "option", "options", "given", "suppose", "assume", "consider", "described", "describes", "example",
    "shown", "figure", "table", "approximately", "closest", "nearest", "value", "calculate", "find",
    "determine", "does", "did", "used", "use", "using", "mr", "ms", "mrs", "dr",
])
_NOT_WORDS = re.compile(r"\b(mathrm|circ|sqrt|vec|frac|times|cdot|left|right|text)\b")
_TERM_FRAMES = ("what is {a}{t}?", "what's {a}{t}", "explain {t} simply", "can you explain {t}?",
                "how does {t} work?", "why does {t} matter?", "help me understand {t}", "{t} explained briefly",
                "quick question about {t}", "what should i know about {t}?", "give me a simple example of {t}",
                "whats the difference between {t} and {u}?", "{t} vs {u}", "eli5 {t}", "summarize {t} for me",
                "i keep getting confused by {t}, any tips?", "what do people mean by {t}?",
                "is {t} related to {u}?", "how is {t} used in practice?", "where does {t} come from?")


def subject_terms(rows: list[dict], top: int = 150, min_rows: int = 5, purity: float = 0.8) -> dict[str, list[str]]:
    """Words and word pairs that mark one subject in the exam rows, the `top` most frequent per label: in at
    least `min_rows` rows (distinct texts: a passage shared by several questions counts once), and in one
    label's rows for at least `purity` of them. They carry a subject's meaning without the exam's frame."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    seen: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    firsts = {r["text"][:200]: r for r in rows}  # questions on one passage share its opening
    for r in firsts.values():
        words = [w for w in _WORD.findall(r["text"].lower()) if w not in ENGLISH_STOP_WORDS and w not in _EXAM_WORDS]
        terms = {w for w in words if len(w) > 4} | {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)
                                                    if min(len(a), len(b)) > 3}
        for t in terms:
            seen[t][r["label"]] += 1
    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for term, counts in seen.items():
        label, most = max(counts.items(), key=lambda kv: kv[1])
        total = sum(counts.values())
        if total >= min_rows and most >= purity * total and not _NOT_WORDS.search(term):
            ranked[label].append((-most, term))
    return {label: [t for _, t in sorted(terms)[:top]] for label, terms in sorted(ranked.items())}


def term_questions(rows: list[dict], per_label: int, rng: random.Random) -> list[dict]:
    """Short everyday questions around each subject's marking terms ("what's a polymer", "mean vs median"),
    the same number per label: how people ask about a subject, which exam rows never show."""
    out = []
    for label, terms in sorted(subject_terms(rows).items()):
        for _ in range(min(per_label, 2 * len(terms))):
            t, u = rng.choice(terms), rng.choice(terms)
            a = "" if " " in t or t.endswith("s") else ("an " if t[0] in "aeiou" else "a ")
            text = rng.choice(_TERM_FRAMES).format(t=t, u=u, a=a)
            out.append({"text": text[0].upper() + text[1:] if rng.random() < 0.5 else text, "label": label})
    return out


def category_rows(data: Path, term_rows: int = 500) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Train (exam rows, their chat-style cuts, our everyday training questions), a development split for
    early stopping (exam rows and 15% of the everyday training questions: the checkpoint kept must do well on
    both kinds of traffic), the held-out exam validation split, scored once at the end, and questions around
    each subject's terms (category training only: the PII sets draw their prose from the first)."""
    train, dev, val = [], [], []
    for name in ("mmlu_pro", "mmlu"):
        rest, va = exam_split(read_jsonl(data / name / "train.jsonl"))
        tr, de = exam_split(rest, seed=43)
        train += tr
        dev += de[:400]
        val += va
    rng = random.Random(11)
    chat = [{"text": t, "label": r["label"]} for r in train if (t := chat_style(r["text"], rng))]
    held = HeldOut([r["text"] for r in read_jsonl(EVERYDAY_EVAL)])
    terms = [r for r in term_questions(train, term_rows, random.Random(12)) if r["text"] not in held]
    everyday = [{"text": r["text"], "label": r["label"]} for r in read_jsonl(EVERYDAY_TRAIN)
                if r["text"] not in held]  # common questions get written twice; never train on one
    everyday, everyday_dev = exam_split(everyday, seed=44, share=0.15)
    dev = [r for r in dev + everyday_dev if r["text"] not in held]
    return [r for r in train + chat if r["text"] not in held] + everyday, dev, val, terms


def _norm(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


_ASK_WORDS = frozenset([  # how a question is asked, not what it asks about
    "explain", "briefly", "brief", "simple", "simply", "terms", "difference", "quick", "eli5", "summarize", "work",
    "works", "mean", "means", "actually", "really", "basically", "example", "examples", "tell", "like", "does",
    "did", "whats", "vs", "just", "pls", "please", "tldr", "way", "ways", "help", "understand", "used", "happen",
    "happened", "exactly", "words", "plain",
])


def _subject_words(text: str) -> frozenset[str]:
    """What a question asks about: its words less stop words and asking words, a plural's final s dropped."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    words = (w for w in re.findall(r"[a-z0-9]+", text.lower())
             if len(w) > 1 and w not in ENGLISH_STOP_WORDS and w not in _ASK_WORDS)
    return frozenset(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words)


class HeldOut:
    """Held-out questions, and `text in held` for a question that asks the same as one of them: the same
    letters, or half or more of its subject words shared ("why do cells even need mitochondria" against "why
    do cells need mitochondria"). People ask common questions in near-identical words, so a training row of
    that kind would be a held-out question seen in training. Questions on one frame with other subjects ("how
    does insulin work", "how does DNS work") share no subject word and stay."""

    def __init__(self, texts: list[str], overlap: float = 0.5) -> None:
        self.exact = {_norm(t) for t in texts}
        self.words = [_subject_words(t) for t in texts]
        self.overlap = overlap
        self.index: dict[str, list[int]] = defaultdict(list)
        for i, words in enumerate(self.words):
            for w in words:
                self.index[w].append(i)

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str):
            return False
        if _norm(text) in self.exact:
            return True
        words = _subject_words(text)
        candidates = {i for w in words for i in self.index.get(w, ())}
        return any(len(words & self.words[i]) >= self.overlap * len(words | self.words[i]) for i in candidates)


# --- PII -----------------------------------------------------------------------------------------------

def presidio_split(rows: list[dict], share: float = 0.15, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """Whole templates held out: a row of a held-out template never trains."""
    templates = sorted({r["template_id"] for r in rows})
    random.Random(seed).shuffle(templates)
    held = set(templates[:max(1, round(len(templates) * share))])
    return [r for r in rows if r["template_id"] not in held], [r for r in rows if r["template_id"] in held]


def as_spans(row: dict) -> dict:
    """One span format for every source ({"text", "spans": [{"start", "end", "label"}]})."""
    if "full_text" in row:
        return {"text": row["full_text"], "spans": [
            {"start": s["start_position"], "end": s["end_position"], "label": s["entity_type"]} for s in row["spans"]]}
    return {"text": row["text"], "spans": [{"start": s["start"], "end": s["end"], "label": s["label"]}
                                           for s in row["spans"]]}


def _prose(pool: list[str], chars: int, rng: random.Random) -> str:
    out, size = [], 0
    while size < chars:
        text = rng.choice(pool)
        out.append(text)
        size += len(text) + 1
    return rng.choice((" ", "\n", "\n\n")).join(out)[:chars].rsplit(" ", 1)[0] if chars else ""


def in_context(row: dict, pool: list[str], before: int, after: int, rng: random.Random) -> dict:
    """`row` with PII-free prose of about `before` characters ahead of it and `after` behind it."""
    head, tail = _prose(pool, before, rng), _prose(pool, after, rng)
    sep = rng.choice((" ", "\n", "\n\n"))
    lead = head + sep if head else ""
    text = lead + row["text"] + (sep + tail if tail else "")
    shift = len(lead)
    return {"text": text, "spans": [{**s, "start": s["start"] + shift, "end": s["end"] + shift} for s in row["spans"]],
            "inner": [shift, shift + len(row["text"])]}  # where the PII sentence sits: same spans alone?


_NAME_RE = re.compile(r"(?<![^\W\d_])[A-Z][a-z]+")


def looks_name_free(text: str, first_names: set[str]) -> bool:
    """Exam questions name people ("Zoey is laying bricks") without labels: as negatives they would
    teach the model to pass names, and in the held-out set naming no one a masked name would count as a
    false mask, so those with a known first name anywhere (a sentence's first word too: "Alice has 8
    buckets") are left out."""
    return not any(m.group(0) in first_names for m in _NAME_RE.finditer(text))


def first_names() -> set[str]:
    from faker import Faker

    names: set[str] = set()
    for locale in ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL"):
        provider = Faker(locale)
        provider.seed_instance(0)  # the same names, so the same negatives, on every build
        for _ in range(4000):
            names.add(provider.first_name())
    return names


def wnut_split(rows: list[dict], seed: int = 42) -> tuple[list[dict], list[dict]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = len(rows) // 5
    return rows[n_val:], rows[:n_val]


def pii_rows(data: Path, synth_train: list[dict], synth_val: list[dict], exam_train: list[dict],
             exam_val: list[dict]) -> dict[str, list[dict]]:
    presidio_train, presidio_val = presidio_split(json.loads((data / "presidio" / "generated_large.json").read_text()))
    wnut_train, wnut_val = wnut_split(read_jsonl(data / "wnut17" / "train.jsonl"))
    names = first_names()
    rng, val_rng = random.Random(5), random.Random(6)  # apart: a change to the training rows moves no held-out set
    clean_exam_train = [r["text"] for r in exam_train if looks_name_free(r["text"], names)]
    clean_exam_val = [r["text"] for r in exam_val if looks_name_free(r["text"], names)]
    wnut_clean_train = [r["text"] for r in wnut_train if not r["spans"]]
    wnut_clean_val = [r["text"] for r in wnut_val if not r["spans"]]
    rng.shuffle(clean_exam_train)
    val_rng.shuffle(clean_exam_val)

    train_pool, val_pool = clean_exam_train + wnut_clean_train, clean_exam_val + wnut_clean_val
    positives = [as_spans(r) for r in synth_train + presidio_train if r.get("spans")]
    context = [in_context(rng.choice(positives), train_pool, rng.choice((0, rng.randint(20, 900))),
                          rng.randint(0, 300), rng) for _ in range(2500)]
    held = [as_spans(r) for r in presidio_val + synth_val if r.get("spans")]
    any_position = []
    for _ in range(400):
        total = val_rng.randint(1024, 8192)
        before = val_rng.randint(0, total)
        any_position.append(in_context(val_rng.choice(held), val_pool, before, total - before, val_rng))
    return {
        "presidio_train": presidio_train, "presidio_val": presidio_val,
        "wnut_train": wnut_train, "wnut_val": wnut_val,
        "context_train": context, "any_position_val": any_position,
        "clean_train": [{"text": t, "spans": []} for t in clean_exam_train[:2000]],
        "clean_val": [{"text": t, "spans": []} for t in clean_exam_val[:400]],
        "wnut_clean_val": [{"text": t, "spans": []} for t in wnut_clean_val],
    }


def by_label(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["label"]] += 1
    return dict(sorted(counts.items()))
