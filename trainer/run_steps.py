"""Steps every training run shares (fine-tuning and masked-LM pretraining): load a base model, point
TensorBoard at the run, build the Trainer, save what it made, drop the checkpoints."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class BaseModelError(ValueError):
    """The base model cannot be loaded; the message names it."""


def load_pretrained(base_model: str, load: Callable[[str], T]) -> T:
    """`load(base_model)`, with a loading failure turned into one line naming the base model."""
    try:
        return load(base_model)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BaseModelError(f"{base_model}: cannot load the base model ({first})") from e


@contextlib.contextmanager
def tensorboard_logs(path: Path) -> Iterator[None]:
    """Point TensorBoard at ``path``: transformers 5 reads the log directory from the environment only."""
    name = "TENSORBOARD_LOGGING_DIR"
    old = os.environ.get(name)
    os.environ[name] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def make_trainer(logging_dir: Path, trainer_class: type | None = None, **kwargs: Any):
    """A `transformers.Trainer` (or `trainer_class`) whose TensorBoard callback writes to `logging_dir`."""
    from transformers import Trainer

    with tensorboard_logs(logging_dir):  # the callback reads it when the Trainer is built
        return (trainer_class or Trainer)(**kwargs)


def save_model(model, tokenizer, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def drop_checkpoints(checkpoints: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(checkpoints, ignore_errors=True)
