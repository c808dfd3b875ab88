"""Tokenization and windowing: text -> token ids with character offsets -> model-sized windows.

Texts are encoded once without special tokens, so offsets index the caller's string (code points).
Category models see one truncated window; PII models see every token, in windows of ``max_length - 2``
tokens that overlap by ``stride``, each wrapped in CLS/SEP. Window logits are merged back so that each
token takes the prediction from the window where it had the most context on both sides. With line
windows on, a text of several lines is also read line by line (a `Part` per line, in windows of its
own), so what comes before a line cannot hide what is in it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from model_contract.model_dir import ModelDir
from sidecar.errors import InferenceCancelled, ModelLoadError

_FAR = np.iinfo(np.int64).max
# Generous: subword tokens average 3-5 characters of English; a prefix this long almost always holds a
# full window, and the fallback covers the rest.
_CHARS_PER_TOKEN = 8
# Long texts are tokenized in pieces of about this many characters, cut where the tokenizer would split
# anyway, and pieces go to `encode_batch` about _CALL_CHARS at a time: that call runs without the GIL
# (``encode`` holds it throughout: 0.35 s of a stalled event loop for 300 KB on 2 busy cores), and
# between calls the work can be stopped.
_PIECE_CHARS = 16384
_CALL_CHARS = 65536
# Line windows: a line read alone takes the lines after it until it holds this many tokens, which bounds
# the extra passes (a text of one-token lines would otherwise be a window per token).
LINE_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Encoded:
    """A text's tokens without special tokens: ids ``[n]`` and character offsets ``[n, 2]`` (int64)."""

    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Window:
    """Tokens ``[start, start + length)`` of a text, as model input ``[CLS] ... [SEP]``."""

    start: int
    ids: np.ndarray

    @property
    def length(self) -> int:
        return len(self.ids) - 2


@dataclass(frozen=True, slots=True)
class Part:
    """Tokens ``[start, end)`` of a text read on their own: the whole text, or a line (with the lines after
    it, while it is short). Window starts count from `start`."""

    start: int
    end: int
    windows: list[Window]


def windows_of(parts: Sequence[Part]) -> list[Window]:
    """Every window of a text's parts, in order (how they go to the batcher and come back)."""
    return parts[0].windows if len(parts) == 1 else [w for part in parts for w in part.windows]


class TextEncoder:
    """One model's tokenizer and window geometry; built once per model, shared by all requests."""

    def __init__(self, tokenizer, cls_id: int, sep_id: int, max_length: int, stride: int,
                 line_windows: bool = False):
        if stride >= max_length - 2:
            raise ModelLoadError(f"stride {stride} must be smaller than max_length - 2 = {max_length - 2}")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self._cls = np.array([cls_id], dtype=np.int64)
        self._sep = np.array([sep_id], dtype=np.int64)
        self.max_length = max_length
        self.stride = stride
        self.line_windows = line_windows

    @classmethod
    def for_model(cls, model_dir: ModelDir, max_length: int | None, stride: int | None,
                  line_windows: bool = False) -> TextEncoder:
        """Windows of the configured length, else the length the model was trained at, else 512; never
        longer than the model's position embeddings, whatever the config asks."""
        length = min(window_length(model_dir, max_length), model_dir.max_position_embeddings)
        if stride is None:  # 64 tokens, at most a quarter of a window: a 128-token model reads 200 tokens in
            stride = min(DEFAULT_STRIDE, (length - 2) // 4)  # 2 windows, not 3, and names and emails still fit
        return cls(model_dir.load_tokenizer(), model_dir.cls_token_id, model_dir.sep_token_id, length, stride,
                   line_windows)

    @property
    def body(self) -> int:
        """Text tokens per window (the rest is CLS and SEP)."""
        return self.max_length - 2

    def encode(self, text: str) -> Encoded:
        return _encoded(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_all(self, texts: Sequence[str], stop: threading.Event | None = None) -> list[Encoded]:
        """:meth:`encode` for each text, with the GIL released: long texts are cut into pieces that
        tokenize as the whole does, and the pieces of all texts go to `encode_batch` a few at a time.
        When `stop` is set between calls, `InferenceCancelled` is raised."""
        pieces: list[tuple[int, int, int]] = []  # (text, start, end)
        for i, text in enumerate(texts):
            starts = piece_starts(text, _PIECE_CHARS)
            pieces += [(i, a, b) for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
        ids: list[list[np.ndarray]] = [[] for _ in texts]
        offsets: list[list[np.ndarray]] = [[] for _ in texts]
        first = 0
        while first < len(pieces):
            if stop is not None and stop.is_set():
                raise InferenceCancelled("tokenization stopped: its caller has gone")
            last, chars = first, 0
            while last < len(pieces) and (last == first or chars + pieces[last][2] - pieces[last][1] <= _CALL_CHARS):
                chars += pieces[last][2] - pieces[last][1]
                last += 1
            call = pieces[first:last]
            encodings = self._tokenizer.encode_batch([texts[i][a:b] for i, a, b in call], add_special_tokens=False)
            for (i, a, _), encoding in zip(call, encodings, strict=True):
                piece = _encoded(encoding)
                ids[i].append(piece.ids)
                offsets[i].append(piece.offsets + a if a else piece.offsets)
            first = last
        return [Encoded(np.concatenate(i), np.concatenate(o)) if len(i) > 1 else Encoded(i[0], o[0])
                for i, o in zip(ids, offsets, strict=True)]

    def encode_many(self, texts: Sequence[str]) -> list[Encoded]:
        return [_encoded(e) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def head(self, encoded: Encoded) -> np.ndarray:
        """The first window only: what a category model reads of a long text."""
        return self._wrap(encoded.ids[: self.body])

    def head_of(self, text: str) -> np.ndarray:
        """The first window of `text`, tokenizing only a prefix when the text is long.

        The prefix is cut where the tokenizer splits anyway (before a space), so every token before the
        cut is the one the whole text gives; a prefix that holds less than a window is grown fourfold
        until it does, so the work stays near one window's whatever the text's length. (A text with no
        space to cut at is cut at a character; only the tokens at that cut can differ.) Offsets are
        never built: a category model does not need them (they cost a tenth of the tokenization).
        """
        limit = self.body * _CHARS_PER_TOKEN
        while len(text) > limit:
            ids = self._tokenizer.encode(text[: _cut_before(text, limit)], add_special_tokens=False).ids
            if len(ids) >= self.body:
                return self._wrap_list(ids)
            limit *= 4
        return self._wrap_list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def heads_of(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`head_of` for many texts, tokenized together. Without offsets (`encode_batch_fast`): a
        category model does not read them, and they cost 8-25% of the tokenization (measured here)."""
        prefixes = [_prefix(t, self.body) or t for t in texts]
        heads = []
        for text, prefix, encoding in zip(
            texts, prefixes, self._tokenizer.encode_batch_fast(prefixes, add_special_tokens=False), strict=True
        ):
            ids = encoding.ids
            if prefix is not text and len(ids) < self.body:
                ids = self._tokenizer.encode(text, add_special_tokens=False).ids
            heads.append(self._wrap_list(ids))
        return heads

    def windows(self, encoded: Encoded) -> list[Window]:
        """Overlapping windows covering every token; none for an empty text."""
        return self._windows(encoded.ids)

    def parts(self, text: str, encoded: Encoded) -> list[Part]:
        """How a PII model reads `text`: the whole text in windows, then (line windows on, two lines or
        more) each line in windows of its own."""
        parts = [Part(0, len(encoded), self._windows(encoded.ids))]
        if self.line_windows:
            ranges = line_ranges(text, encoded.offsets, LINE_TOKENS)
            parts += [Part(a, b, self._windows(encoded.ids[a:b])) for a, b in ranges]
        return parts

    def _windows(self, ids: np.ndarray) -> list[Window]:
        return [Window(start, self._wrap(ids[start : start + self.body]))
                for start in window_starts(len(ids), self.body, self.stride)]

    def _wrap(self, ids: np.ndarray) -> np.ndarray:
        return np.concatenate((self._cls, ids, self._sep))

    def _wrap_list(self, ids: list[int]) -> np.ndarray:
        """``[CLS] ids[:body] [SEP]`` from the tokenizer's list, in one allocation."""
        n = min(len(ids), self.body)
        out = np.empty(n + 2, dtype=np.int64)
        out[0], out[n + 1] = self._cls[0], self._sep[0]
        out[1 : n + 1] = ids[:n]
        return out


def window_starts(n_tokens: int, body: int, stride: int) -> list[int]:
    """Starts of windows of `body` tokens stepping by ``body - stride``; the last one ends at the text's end
    so that no window is short of context."""
    if n_tokens <= body:
        return [0] if n_tokens else []
    last = n_tokens - body
    starts = list(range(0, last, body - stride))
    starts.append(last)
    return starts


def line_ranges(text: str, offsets: np.ndarray, min_tokens: int = 1) -> list[tuple[int, int]]:
    """Token ranges ``[a, b)`` of the lines of `text`, none when fewer than two ranges: a token belongs to the
    line its first character is on (a line's "\\n" ends it), and a range starts at a line's start and takes
    the lines after it until it holds `min_tokens` tokens, so a text of many tiny lines is not read as that
    many windows."""
    if len(offsets) < 2 or "\n" not in text:
        return []
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # offsets count these
    line = np.searchsorted(np.flatnonzero(points == 10), offsets[:, 0], side="left")
    ends = [*(np.flatnonzero(line[1:] != line[:-1]) + 1).tolist(), len(offsets)]
    ranges, start = [], 0
    for end in ends:
        if end - start >= min_tokens or end == ends[-1]:
            ranges.append((start, end))
            start = end
    return ranges if len(ranges) > 1 else []


def merge_windows(n_tokens: int, windows: Sequence[Window], logits: Sequence[np.ndarray]) -> np.ndarray:
    """Per-token logits ``[n_tokens, labels]`` from per-window logits ``[length + 2, labels]``.

    Each token takes the row from the window where it sits furthest from a cut edge (an edge that is the
    text's own start or end cuts no context), so an entity crossing a window edge is decoded from the
    window that saw it whole.
    """
    if len(windows) == 1:
        return logits[0][1 : 1 + windows[0].length]
    out = np.empty((n_tokens, logits[0].shape[-1]), dtype=logits[0].dtype)
    best = np.full(n_tokens, -1, dtype=np.int64)
    for window, rows in zip(windows, logits, strict=True):
        start, end = window.start, window.start + window.length
        pos = np.arange(start, end, dtype=np.int64)
        left = pos - start if start > 0 else np.full(len(pos), _FAR)
        right = (end - 1) - pos if end < n_tokens else np.full(len(pos), _FAR)
        distance = np.minimum(left, right)
        take = distance > best[start:end]
        out[start:end][take] = rows[1 : 1 + window.length][take]
        best[start:end][take] = distance[take]
    return out


def piece_starts(text: str, size: int) -> list[int]:
    """Where to cut `text` into pieces of about `size` characters that tokenize as the whole text does:
    before a space that follows a non-space (byte-level BPE splits there), or hard at `size` in a text
    without one."""
    starts = [0]
    while len(text) - starts[-1] > size:
        starts.append(_cut_before(text, starts[-1] + size, starts[-1] + 1))
    return starts


def _cut_before(text: str, limit: int, low: int = 1) -> int:
    """The last position in ``[low, limit]`` holding a space after a non-space; `limit` when none does."""
    cut = text.rfind(" ", low, limit + 1)
    while cut >= low and text[cut - 1].isspace():
        cut = text.rfind(" ", low, cut)
    return cut if cut >= low else limit


def _prefix(text: str, tokens: int) -> str | None:
    """A prefix likely to hold `tokens` tokens, ending just before a space; None if the text is short
    or has no space to cut at."""
    limit = tokens * _CHARS_PER_TOKEN
    if len(text) <= limit:
        return None
    cut = text.rfind(" ", 0, limit)
    return text[:cut] if cut > 0 else None


def _encoded(encoding) -> Encoded:
    ids = np.asarray(encoding.ids, dtype=np.int64)
    # Flattening the list of (start, end) tuples first is twice as fast as np.asarray on the tuples.
    offsets = np.fromiter(chain.from_iterable(encoding.offsets), dtype=np.int64, count=2 * len(ids))
    return Encoded(ids, offsets.reshape(len(ids), 2))


DEFAULT_WINDOW = 512
DEFAULT_STRIDE = 64


def window_length(model_dir: ModelDir, configured: int | None) -> int:
    """What ``models.<name>.max_length`` means when it is unset."""
    return configured or model_dir.trained_length or DEFAULT_WINDOW
