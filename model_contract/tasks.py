"""Tasks: what a classifier is, defined once for the trainer, the export, the engine and the evaluation.

A task names its head, and the head decides everything the code varies on: the Hugging Face model class,
how labels are checked, how text is windowed for the model (a sequence head reads the first window, a
token head every window), how its logits are decoded and scored. ``category`` and ``pii`` are registered
here; a new classifier (a prompt-injection detector, say) is one `register` call plus a ``models:`` entry
in the sidecar's config, and ``trainer <name>`` trains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Head = Literal["sequence", "token"]

OUTSIDE = "O"
"""The BIO tag of a token outside every entity: a token head's labels must have it."""


class UnknownTask(ValueError):
    """A task name nobody registered; the message lists the known ones."""


@dataclass(frozen=True)
class Task:
    name: str
    """The ``sidecar_task`` of its model directories, its ``models:`` key, its ``trainer`` subcommand."""
    head: Head
    """sequence: one label per text, read from the first window (``...ForSequenceClassification``); token: a
    BIO tag per token over every window (``...ForTokenClassification``), decoded into spans."""
    description: str
    """One line for the model card and ``trainer --help``."""

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads its models."""
        return "AutoModelForSequenceClassification" if self.head == "sequence" else "AutoModelForTokenClassification"

    @property
    def architecture_suffix(self) -> str:
        return "ForSequenceClassification" if self.head == "sequence" else "ForTokenClassification"

    def label_problem(self, labels: list[str]) -> str | None:
        """Why `labels` cannot be this task's, or None."""
        if self.head == "token" and OUTSIDE not in labels:
            return f"a {self.name} model needs an '{OUTSIDE}' label among its BIO tags"
        return None


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make `task` known everywhere (model directories, config, trainer, engine); idempotent for the same one."""
    known = _REGISTRY.get(task.name)
    if known is not None and known != task:
        raise ValueError(f"task '{task.name}' is already registered differently")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    """For tests that register a throwaway task."""
    _REGISTRY.pop(name, None)


def get_task(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTask(f"unknown task '{name}'; known: {', '.join(_REGISTRY)}") from None


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def task_for_architecture(architectures: list[str]) -> Task | None:
    """The one registered task whose head an architecture name implies (``ModernBertForTokenClassification``
    → the token task), or None when none or several match."""
    for arch in architectures:
        matches = [t for t in _REGISTRY.values() if arch.endswith(t.architecture_suffix)]
        if len(matches) == 1:
            return matches[0]
    return None


CATEGORY = register(Task("category", "sequence", "subject classifier: one of the 14 MMLU-Pro subjects per text"))
PII = register(Task("pii", "token", "PII token classifier: BIO tags with Presidio entity names"))
