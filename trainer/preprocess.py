"""Tokenization for both tasks and THE label-alignment function for token classification.

Category texts are truncated to ``max_length``. PII texts are split into overlapping windows
(``return_overflowing_tokens`` with ``stride``) so an entity late in a long text is still trained on;
consecutive windows of one text share exactly ``stride`` tokens, which evaluation uses to count every
token once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trainer.data import OUTSIDE, EntitySpan, SpanExample, TextExample
from trainer.settings import UsageError

IGNORE_INDEX = -100
"""Label id the loss and the metrics skip (special tokens, padding, already-counted overlap)."""


def align_labels(
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[EntitySpan],
    text: str,
    label2id: Mapping[str, int],
    special_tokens_mask: Sequence[int] | None = None,
) -> list[int]:
    """BIO label ids for tokens with character ``offsets`` into ``text``.

    The first token touching an entity gets ``B-X`` and the following tokens of the same entity ``I-X``;
    special tokens (flagged in ``special_tokens_mask`` or with an empty ``(0, 0)`` range) get
    ``IGNORE_INDEX``; everything else ``O``. Byte-level BPE ranges start at the space before a word, so
    leading whitespace is trimmed before testing overlap. A token that only partly overlaps an entity
    (the span starts or ends inside a sub-word, or several byte tokens share one CJK character's range)
    still belongs to it. A whitespace-only token inside an entity continues it.
    """
    ordered = sorted(spans, key=lambda s: s.start)
    outside = label2id[OUTSIDE]
    labels: list[int] = []
    previous: EntitySpan | None = None
    for i, (start, end) in enumerate(offsets):
        if (special_tokens_mask is not None and special_tokens_mask[i]) or start == end:
            labels.append(IGNORE_INDEX)
            previous = None
            continue
        trimmed = start
        while trimmed < end and text[trimmed].isspace():
            trimmed += 1
        if trimmed == end:
            inside = previous is not None and previous.start <= start and end < previous.end
            labels.append(label2id[f"I-{previous.label}"] if inside else outside)
            previous = previous if inside else None
            continue
        entity = next((s for s in ordered if s.start < end and trimmed < s.end), None)
        if entity is None:
            labels.append(outside)
        elif entity is previous:
            labels.append(label2id[f"I-{entity.label}"])
        else:
            labels.append(label2id[f"B-{entity.label}"])
        previous = entity
    return labels


def check_window(tokenizer, max_length: int, stride: int | None = None) -> None:
    """Fail early on a window the tokenizer cannot make."""
    room = max_length - tokenizer.num_special_tokens_to_add()
    if room < 1:
        raise UsageError(f"--max-length {max_length} leaves no room for text after the special tokens")
    if stride is not None and not 0 <= stride < room:
        raise UsageError(f"--stride must be in [0, {room}) for --max-length {max_length}, got {stride}")


def encode_category(
    tokenizer, examples: Sequence[TextExample], label2id: Mapping[str, int], max_length: int
) -> dict[str, list]:
    """Truncated ``input_ids``/``attention_mask`` and one label id per text."""
    check_window(tokenizer, max_length)
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": [label2id[e.label] for e in examples],
    }


@dataclass(frozen=True)
class PiiWindows:
    """Token windows of span examples with aligned labels.

    ``example[k]`` is the index of the example window ``k`` came from; ``overlap[k]`` is the number of
    leading text tokens window ``k`` shares with the window before it (0 for a text's first window).
    """

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[list[int]]
    offsets: list[list[tuple[int, int]]]
    example: list[int]
    overlap: list[int]

    def features(self) -> dict[str, list]:
        """The columns a model takes (for ``datasets.Dataset.from_dict``)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_pii(
    tokenizer, examples: Sequence[SpanExample], label2id: Mapping[str, int], max_length: int, stride: int
) -> PiiWindows:
    """Overlapping windows of every text, labelled through the offset mapping."""
    check_window(tokenizer, max_length, stride)
    enc = tokenizer(
        [e.text for e in examples],
        truncation=True,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    mapping = enc["overflow_to_sample_mapping"]
    labels, overlap = [], []
    for k, index in enumerate(mapping):
        ex = examples[index]
        labels.append(align_labels(enc["offset_mapping"][k], ex.spans, ex.text, label2id, enc["special_tokens_mask"][k]))
        overlap.append(stride if k > 0 and mapping[k - 1] == index else 0)
    return PiiWindows(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        labels=labels,
        offsets=[[tuple(o) for o in offs] for offs in enc["offset_mapping"]],
        example=list(mapping),
        overlap=overlap,
    )


def without_overlap(labels: Sequence[int], overlap: int) -> list[int]:
    """``labels`` with the first ``overlap`` text tokens ignored: tokens the previous window already had."""
    out = list(labels)
    skipped = 0
    for i, label in enumerate(out):
        if skipped == overlap:
            break
        if label != IGNORE_INDEX:
            out[i] = IGNORE_INDEX
            skipped += 1
    return out
