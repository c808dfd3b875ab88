"""Training data: loaders, validation and the validation split.

Sources are local JSONL / JSON / CSV / Parquet files, a local ``datasets`` directory (``save_to_disk``
output or a folder of data files), or a Hugging Face dataset id. Two shapes come out:

- category rows: a text and a label (column names configurable, e.g. MMLU-Pro's ``question``/``category``);
- span rows: a text and character spans, either ``{"text", "spans": [{"start", "end", "label"}]}`` or
  Presidio's ``{"full_text", "spans": [{"entity_type", "start_position", "end_position"}]}``, detected
  per row.

Every problem is a ``DataError`` naming the file, the row and what is wrong. A row is the line number
for JSONL, the spreadsheet row for CSV (the header is row 1) and the 1-based record number otherwise.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from model_contract.tasks import OUTSIDE, get_task
from trainer.settings import UsageError

log = structlog.get_logger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class DataError(ValueError):
    """Unusable input data; ``str(e)`` is ``<file>:<row>: <problem>`` (or ``<file>: <problem>``)."""

    def __init__(self, file: str | Path, row: int | None, problem: str):
        self.file = str(file)
        self.row = row
        self.problem = problem
        where = f"{self.file}:{row}" if row is not None else self.file
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class TextExample:
    """One labelled text for sequence classification; ``source``/``row`` say where it came from."""

    text: str
    label: str
    source: str
    row: int


@dataclass(frozen=True)
class EntitySpan:
    """A labelled character range ``[start, end)`` of a text (code-point offsets)."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class SpanExample:
    """One text with its entity spans (sorted by start) for token classification."""

    text: str
    spans: tuple[EntitySpan, ...]
    source: str
    row: int


Example = TextExample | SpanExample
Task = str
"""A registered task's name (`model_contract.tasks`): its head says how its data is read."""


@dataclass(frozen=True)
class TaskData:
    """Training and validation examples plus the label list the model will be built with."""

    task: Task
    train: list[Any]
    validation: list[Any]
    labels: list[str]
    """Category names (sorted) or BIO tags (``O`` first, then ``B-``/``I-`` per sorted entity type)."""
    validation_from: str
    """``"file"``, ``"stratified split"`` or ``"random split"``: how the validation set was made."""
    train_sources: list[str]
    validation_sources: list[str]
    text_column: str = "text"
    """The column sequence rows were read from (export calibrates on the same one)."""


# --- reading records -------------------------------------------------------------------------------


def read_records(source: str | Path, split: str = "train") -> Iterator[tuple[int, dict]]:
    """``(row, record)`` pairs from a file, a local dataset directory or a Hugging Face dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix in (".csv", ".tsv"):
            yield from _read_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _read_dataset(_load_parquet(path))
        else:
            raise DataError(path, None, f"unsupported file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
    elif path.is_dir():
        yield from _read_dataset(_load_local_dataset(path, split))
    elif _looks_like_hub_id(str(source)):
        yield from _read_dataset(_load_hub_dataset(str(source), split))
    else:
        raise DataError(source, None, "no such file")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, f"not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataError(path, line_no, f"expected a JSON object, got {_kind(record)}")
            yield line_no, record


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    """A JSON array of objects (Presidio's files), or JSON Lines that happen to end in ``.json``."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _read_jsonl(path)
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, None, f"not valid JSON ({e.msg} at line {e.lineno})") from e
    for i, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(path, i, f"expected a JSON object, got {_kind(record)}")
        yield i, record


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        for i, record in enumerate(reader, 2):
            if None in record:
                raise DataError(path, i, f"more fields than the header's {len(reader.fieldnames or [])}")
            yield i, record


def _load_parquet(path: Path):
    import datasets

    try:
        return datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow raises many types for a bad file
        raise DataError(path, None, f"cannot read Parquet ({_first_line(e)})") from e


def _load_local_dataset(path: Path, split: str):
    import datasets

    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    try:
        ds = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), split=split)
    except Exception as e:  # datasets raises many types for a bad directory
        raise DataError(path, None, f"cannot load dataset ({_first_line(e)})") from e
    return _pick_split(ds, path, split)


def _load_hub_dataset(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, unknown split: one line for the user
        raise DataError(name, None, f"not a local file and could not be loaded from the Hub ({_first_line(e)})") from e


def _pick_split(ds, path: Path, split: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(path, None, f"no split '{split}' (splits: {', '.join(ds)}); choose one with --dataset-split")
        return ds[split]
    return ds


def _read_dataset(ds) -> Iterator[tuple[int, dict]]:
    yield from enumerate(ds, 1)


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(FILE_SUFFIXES)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --- category rows ---------------------------------------------------------------------------------


def load_category(
    source: str | Path, text_column: str = "text", label_column: str = "label", split: str = "train"
) -> list[TextExample]:
    """Labelled texts from one source; every row is checked."""
    examples = []
    for row, record in read_records(source, split):
        text = _text(record, text_column, source, row, flag="--text-column")
        label = record.get(label_column, _MISSING)
        if label is _MISSING:
            raise DataError(source, row, _missing_column(label_column, record, "--label-column"))
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise DataError(source, row, f"label column '{label_column}' is {_kind(label)}, expected a string")
        label = str(label).strip()
        if not label:
            raise DataError(source, row, f"empty label in column '{label_column}'")
        examples.append(TextExample(text=text, label=label, source=str(source), row=row))
    if not examples:
        raise DataError(source, None, "empty file: no rows")
    return examples


_MISSING = object()


def _text(record: dict, column: str, source, row: int, flag: str | None = None) -> str:
    value = record.get(column, _MISSING)
    if value is _MISSING:
        raise DataError(source, row, _missing_column(column, record, flag))
    if not isinstance(value, str):
        raise DataError(source, row, f"text column '{column}' is {_kind(value)}, expected a string")
    if not value.strip():
        raise DataError(source, row, f"empty text in column '{column}'")
    return value


def _missing_column(column: str, record: dict, flag: str | None) -> str:
    columns = ", ".join(map(str, record)) or "none"
    hint = f"; choose another with {flag}" if flag else ""
    return f"missing column '{column}' (columns: {columns}){hint}"


# --- span rows -------------------------------------------------------------------------------------


def load_spans(source: str | Path, split: str = "train") -> list[SpanExample]:
    """Texts with entity spans, in the span JSONL format or Presidio's, detected per row."""
    examples = []
    for row, record in read_records(source, split):
        presidio = "full_text" in record
        text = _text(record, "full_text" if presidio else "text", source, row)
        raw = record.get("spans", _MISSING)
        if raw is _MISSING:
            raise DataError(source, row, _missing_column("spans", record, None))
        if not isinstance(raw, list):
            raise DataError(source, row, f"'spans' is {_kind(raw)}, expected a list")
        keys = ("start_position", "end_position", "entity_type") if presidio else ("start", "end", "label")
        spans = [_span(s, i, keys, text, source, row) for i, s in enumerate(raw, 1)]
        examples.append(SpanExample(text=text, spans=_check_overlaps(spans, source, row), source=str(source), row=row))
    if not examples:
        raise DataError(source, None, "empty file: no rows")
    return examples


def _span(raw: object, index: int, keys: tuple[str, str, str], text: str, source, row: int) -> EntitySpan:
    start_key, end_key, label_key = keys
    if not isinstance(raw, dict):
        raise DataError(source, row, f"span {index} is {_kind(raw)}, expected an object")
    for key in keys:
        if key not in raw:
            raise DataError(source, row, f"span {index} has no '{key}'")
    start, end, label = raw[start_key], raw[end_key], raw[label_key]
    for key, value in ((start_key, start), (end_key, end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(source, row, f"span {index} '{key}' is {value!r}, expected an integer offset")
    if not isinstance(label, str) or not label.strip():
        raise DataError(source, row, f"span {index} '{label_key}' is {label!r}, expected an entity name")
    if start >= end:
        raise DataError(source, row, f"span {index} ({label}) [{start}, {end}) is empty or inverted")
    if start < 0 or end > len(text):
        raise DataError(
            source, row, f"span {index} ({label}) [{start}, {end}) is out of range for a text of {len(text)} characters"
        )
    return EntitySpan(start=start, end=end, label=label.strip())


def _check_overlaps(spans: list[EntitySpan], source, row: int) -> tuple[EntitySpan, ...]:
    ordered = sorted(spans, key=lambda s: (s.start, s.end))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise DataError(
                source, row, f"spans overlap: {a.label} [{a.start}, {a.end}) and {b.label} [{b.start}, {b.end})"
            )
    return tuple(ordered)


# --- labels ----------------------------------------------------------------------------------------


def category_labels(examples: Sequence[TextExample]) -> list[str]:
    return sorted({e.label for e in examples})


def entity_types(examples: Sequence[SpanExample]) -> list[str]:
    return sorted({s.label for e in examples for s in e.spans})


def bio_labels(types: Sequence[str]) -> list[str]:
    """``O`` then ``B-X``, ``I-X`` for each entity type, in the given order."""
    return [OUTSIDE] + [f"{prefix}-{t}" for t in types for prefix in ("B", "I")]


def check_known_labels(examples: Sequence[Example], known: Sequence[str], what: str) -> None:
    """Fail on the first label outside ``known`` (e.g. a validation label the training data never had)."""
    allowed = set(known)
    for e in examples:
        labels = [e.label] if isinstance(e, TextExample) else [s.label for s in e.spans]
        for label in labels:
            if label not in allowed:
                raise DataError(e.source, e.row, f"unknown label '{label}' (not in {what}: {', '.join(known)})")


# --- selecting and splitting -----------------------------------------------------------------------


def sample(examples: list[Any], limit: int | None, seed: int, what: str = "train") -> list[Any]:
    """At most ``limit`` examples, drawn at random (seeded) so sorted files still give every class."""
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise UsageError(f"--max-{what}-samples must be at least 1")
    picked = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in picked]


def split_validation(
    examples: list[Any], fraction: float, seed: int, stratify: bool
) -> tuple[list[Any], list[Any], str]:
    """Hold out ``fraction`` of the examples; stratified by label when asked and every class allows it."""
    from sklearn.model_selection import train_test_split

    if len(examples) < 2:
        raise DataError(examples[0].source, None, "too few rows to hold out a validation set; pass --validation")
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    indices = list(range(len(examples)))
    if stratify:
        labels = [e.label for e in examples]
        counts = Counter(labels)
        if min(counts.values()) >= 2 and len(counts) <= n_val <= len(examples) - len(counts):
            train_idx, val_idx = train_test_split(indices, test_size=n_val, random_state=seed, stratify=labels)
            return [examples[i] for i in train_idx], [examples[i] for i in val_idx], "stratified split"
        rare = sorted(label for label, n in counts.items() if n < 2)
        log.warning(
            "validation_split_not_stratified",
            reason="a class has fewer than 2 rows" if rare else "too few rows for one of each class",
            rare_classes=rare[:10],
            classes=len(counts),
            validation_rows=n_val,
        )
    train_idx, val_idx = train_test_split(indices, test_size=n_val, random_state=seed, shuffle=True)
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx], "random split"


def load_task_data(
    task: Task,
    train: Sequence[str],
    validation: Sequence[str] | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    split: str = "train",
    validation_split: str = "validation",
    validation_fraction: float = 0.1,
    max_train_samples: int | None = None,
    max_validation_samples: int | None = None,
    seed: int = 42,
) -> TaskData:
    """Load, check and split everything a training run needs, before any model is touched."""

    sequence = get_task(task).head == "sequence"

    def load(source: str, split_name: str) -> list[Any]:
        if sequence:
            return load_category(source, text_column, label_column, split_name)
        return load_spans(source, split_name)

    train_rows = sample([e for s in train for e in load(s, split)], max_train_samples, seed)
    # Labels come from all training rows, before any split: a rare class that lands only in the held-out
    # part still gets its output, and only a separate validation file can hold an unknown label.
    if sequence:
        labels = category_labels(train_rows)
        if len(labels) < 2:
            raise DataError(", ".join(train), None, f"only one label ({labels[0]}); a classifier needs at least two")
        known, what = labels, "the training labels"
    else:
        known, what = entity_types(train_rows), "the training entity types"
        if not known:
            raise DataError(", ".join(train), None, "no entity spans in the training data")
        labels = bio_labels(known)

    if validation:
        val_rows = [e for s in validation for e in load(s, validation_split)]
        check_known_labels(val_rows, known, what)
        validation_from = "file"
    else:
        if not 0 < validation_fraction < 1:
            raise UsageError("--validation-fraction must be between 0 and 1")
        train_rows, val_rows, validation_from = split_validation(
            train_rows, validation_fraction, seed, stratify=sequence
        )
    val_rows = sample(val_rows, max_validation_samples, seed, "validation")
    return TaskData(
        task=task,
        train=train_rows,
        validation=val_rows,
        labels=labels,
        validation_from=validation_from,
        train_sources=[str(s) for s in train],
        validation_sources=[str(s) for s in validation or []],
        text_column=text_column,
    )
