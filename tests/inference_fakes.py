"""Deterministic stand-ins for model backends, and ONNX copies of the tiny fixture models.

The fakes implement the Backend protocol over real token ids, so tokenization, windowing, batching and
decoding are all exercised for real while the "model" answers predictably:

- ``DigitTagger`` tags every all-digit token as PHONE_NUMBER (B- when it starts a number, I- when it
  continues the previous token's digits) and everything else O. A number's first token in a window has
  no left neighbour in that window, so it is tagged B- there: only a correct window merge puts a number
  that crosses a window edge back together.
- ``Fingerprint`` gives a category model's logits that depend on every real token id, so each caller
  can check it got the answer for its own input.

Both record the batches they ran, can block on a gate (to hold the worker busy) and fail on demand.
"""

from __future__ import annotations

import shutil
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from model_contract.model_dir import ModelDir

SCORE = 10.0


class FakeBackend(ABC):
    name = "fake"
    file = "fake"
    providers = ["cpu"]

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.entered = threading.Event()
        self.gate = gate
        self.fail_next = 0

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.calls.append(input_ids.copy())
        self.masks.append(attention_mask.copy())
        self.entered.set()
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise TimeoutError("test gate was never opened")
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("simulated device failure")
        return self.logits(input_ids, attention_mask)

    @abstractmethod
    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """What the model answers for one padded batch."""

    def rows_seen(self) -> list[tuple[int, ...]]:
        """Every real (unpadded) row the backend was given, as tuples of ids."""
        return [
            tuple(ids[row][mask[row].astype(bool)].tolist())
            for ids, mask in zip(self.calls, self.masks, strict=True)
            for row in range(len(ids))
        ]


class DigitTagger(FakeBackend):
    def __init__(self, model_dir: ModelDir, gate: threading.Event | None = None):
        super().__init__(gate)
        labels = model_dir.labels
        self.outside, self.begin, self.inside = labels.index("O"), labels.index("B-PHONE_NUMBER"), labels.index(
            "I-PHONE_NUMBER"
        )
        self.num_labels = len(labels)
        tokenizer = model_dir.load_tokenizer()
        size = tokenizer.get_vocab_size()
        self.digit = np.zeros(size, dtype=bool)
        self.spaced = np.zeros(size, dtype=bool)
        for token, i in tokenizer.get_vocab().items():
            bare = token.removeprefix("Ġ")
            self.digit[i] = bare.isascii() and bare.isdigit()
            self.spaced[i] = token.startswith("Ġ")

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        digit = self.digit[input_ids] & attention_mask.astype(bool)
        after_digit = np.zeros_like(digit)
        after_digit[:, 1:] = digit[:, :-1]
        inside = digit & after_digit & ~self.spaced[input_ids]
        tags = np.full(input_ids.shape, self.outside)
        tags[digit] = self.begin
        tags[inside] = self.inside
        out = np.zeros((*input_ids.shape, self.num_labels), dtype=np.float32)
        np.put_along_axis(out, tags[..., None], SCORE, axis=-1)
        return out


class Fingerprint(FakeBackend):
    def __init__(self, num_labels: int, gate: threading.Event | None = None):
        super().__init__(gate)
        self.num_labels = num_labels

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return fingerprint_logits(input_ids, attention_mask, self.num_labels)


def fingerprint_logits(input_ids: np.ndarray, attention_mask: np.ndarray, num_labels: int) -> np.ndarray:
    """A deterministic function of each row's real tokens (order included)."""
    weights = np.arange(1, input_ids.shape[1] + 1)
    h = ((input_ids * attention_mask * weights).sum(axis=1) % 9973).astype(np.float32)
    out = np.zeros((len(input_ids), num_labels), dtype=np.float32)
    out[:, 0] = h / 1000.0
    out[:, 1] = (h % 7) / 3.0
    return out


_ONNX_COPIES: dict[Path, Path] = {}


def onnx_copy(model_dir: Path, root: Path) -> Path:
    """A copy of `model_dir` with ``model.onnx`` from trainer.export, made once per test session."""
    from trainer.export import export_model_dir

    if model_dir not in _ONNX_COPIES:
        copy = shutil.copytree(model_dir, root / f"{model_dir.name}-onnx")
        export_model_dir(copy, int8=False)
        _ONNX_COPIES[model_dir] = copy
    return _ONNX_COPIES[model_dir]
