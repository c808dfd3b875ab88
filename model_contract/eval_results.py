"""``eval_results.json``: its one reader and writer. Training writes it whole; export, the build recipe and
evaluation add their own sections without touching the others'."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

EVAL_FILE = "eval_results.json"


class EvalResultsError(ValueError):
    """``eval_results.json`` is not a JSON object; the message names the file."""


def read_results(directory: str | os.PathLike) -> dict[str, Any]:
    """The directory's results, or {} when it has none yet."""
    path = Path(directory) / EVAL_FILE
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalResultsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(results, dict):
        raise EvalResultsError(f"{path}: expected a JSON object")
    return results


def write_results(directory: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Replace the file whole, atomically: a reader never sees half of it."""
    path = Path(directory) / EVAL_FILE
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staged, path)
    return path


def update_results(directory: str | os.PathLike, **sections: Any) -> dict[str, Any]:
    """Set `sections` (top-level keys), keeping every other key; returns the new results."""
    results = read_results(directory)
    results.update(sections)
    write_results(directory, results)
    return results
