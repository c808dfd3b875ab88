"""`ModelDir`: a model directory read and checked (the files are listed in `model_contract`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from model_contract.eval_results import read_results
from model_contract.tasks import CATEGORY, PII, Task, UnknownTask, get_task, task_for_architecture, task_names

TASK_CATEGORY = CATEGORY.name
TASK_PII = PII.name

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
CARD_FILE = "README.md"

class ModelDirError(ValueError):
    """A model directory is missing, incomplete or inconsistent; the message names the file."""


@dataclass(frozen=True)
class ModelDir:
    path: Path
    task: str
    id2label: dict[int, str]
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    max_position_embeddings: int
    config: dict

    @property
    def spec(self) -> Task:
        """The task's definition (head, windows, decoding)."""
        return get_task(self.task)

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    @property
    def onnx_path(self) -> Path | None:
        p = self.path / ONNX_FILE
        return p if p.is_file() else None

    @property
    def onnx_int8_path(self) -> Path | None:
        p = self.path / ONNX_INT8_FILE
        return p if p.is_file() else None

    @property
    def has_torch_weights(self) -> bool:
        return (self.path / WEIGHTS_FILE).is_file() or (self.path / "pytorch_model.bin").is_file()

    def load_tokenizer(self):
        """The ``tokenizers`` object (no transformers import on the serving path)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / TOKENIZER_FILE))

    @property
    def trained_length(self) -> int | None:
        """Tokens per window the model was trained at (``sidecar_max_length``, or the training settings
        in ``eval_results.json`` for older directories): a model sees text the way it learnt to."""
        value = self.config.get("sidecar_max_length")
        if value is None:
            value = (self.eval_results().get("settings") or {}).get("max_length")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 2 else None

    def eval_results(self) -> dict:
        return read_results(self.path)

    @classmethod
    def read(cls, path_or_id: str | os.PathLike, expect_task: str | None = None) -> ModelDir:
        """Read a local model directory, or download a Hub repository id into the HF cache first."""
        path = resolve(path_or_id)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise ModelDirError(f"{path}: no {CONFIG_FILE}; not a model directory")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelDirError(f"{config_path}: not valid JSON ({e})") from e
        if not (path / TOKENIZER_FILE).is_file():
            raise ModelDirError(f"{path}: no {TOKENIZER_FILE}; the sidecar needs a fast tokenizer")

        found = task_for_architecture(config.get("architectures") or [])
        task = config.get("sidecar_task") or (found.name if found else None)
        try:
            spec = get_task(task) if isinstance(task, str) else None
        except UnknownTask:
            spec = None
        if spec is None:
            raise ModelDirError(
                f"{config_path}: cannot tell the task; set 'sidecar_task' to one of {', '.join(task_names())}"
            )
        if expect_task and task != expect_task:
            raise ModelDirError(f"{path}: is a '{task}' model, expected a '{expect_task}' model")

        raw = config.get("id2label") or {}
        try:
            id2label = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{config_path}: id2label keys must be integers") from e
        if not id2label or sorted(id2label) != list(range(len(id2label))):
            raise ModelDirError(f"{config_path}: id2label must map 0..N-1 to label names")
        problem = spec.label_problem(list(id2label.values()))
        if problem:
            raise ModelDirError(f"{config_path}: {problem}")

        weights = [path / WEIGHTS_FILE, path / "pytorch_model.bin", path / ONNX_FILE, path / ONNX_INT8_FILE]
        if not any(p.is_file() for p in weights):
            raise ModelDirError(f"{path}: no weights (model.safetensors, model.onnx or model.int8.onnx)")

        def token_id(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int):
                raise ModelDirError(f"{config_path}: '{key}' must be set to an integer token id")
            return value

        return cls(
            path=path,
            task=task,
            id2label=id2label,
            cls_token_id=token_id("cls_token_id"),
            sep_token_id=token_id("sep_token_id"),
            pad_token_id=token_id("pad_token_id"),
            max_position_embeddings=int(config.get("max_position_embeddings") or 512),
            config=config,
        )


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hub id (``org/name``) fetched with ``snapshot_download``."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelDirError(f"{path}: is a file, expected a model directory")
        return path.resolve()
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ModelDirError(f"{text}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text))
    except Exception as e:  # network, auth, missing repo: one clear line for the operator
        raise ModelDirError(f"{text}: not a local directory and could not be fetched from the Hub ({e})") from e
