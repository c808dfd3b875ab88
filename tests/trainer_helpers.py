"""Small data and a CLI runner for the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.cli import main

SPAN_ROWS = [
    {"text": "Email John Smith at john.smith@example.com today.",
     "spans": [{"start": 6, "end": 16, "label": "PERSON"}, {"start": 20, "end": 42, "label": "EMAIL_ADDRESS"}]},
    {"text": "Call Maria Garcia on +1 415 555 0100.",
     "spans": [{"start": 5, "end": 17, "label": "PERSON"}, {"start": 21, "end": 36, "label": "PHONE_NUMBER"}]},
    {"text": "我的名字是张伟，邮箱 zhang.wei@example.cn。",
     "spans": [{"start": 5, "end": 7, "label": "PERSON"}, {"start": 11, "end": 29, "label": "EMAIL_ADDRESS"}]},
    {"text": "Nothing personal in this sentence.", "spans": []},
]

PRESIDIO_ROWS = [
    {"full_text": "Will my account stay active? It's under Donald van der Voet",
     "masked": "Will my account stay active? It's under {{person}}",
     "spans": [{"entity_type": "PERSON", "entity_value": "Donald van der Voet", "start_position": 40, "end_position": 59}],
     "template_id": 40, "metadata": None},
    {"full_text": "Reach Anna Berg at anna@example.org or 030 1234567.",
     "masked": "Reach {{person}} at {{email}} or {{phone}}.",
     "spans": [{"entity_type": "PHONE_NUMBER", "entity_value": "030 1234567", "start_position": 39, "end_position": 50},
               {"entity_type": "PERSON", "entity_value": "Anna Berg", "start_position": 6, "end_position": 15},
               {"entity_type": "EMAIL_ADDRESS", "entity_value": "anna@example.org", "start_position": 19, "end_position": 35}],
     "template_id": 7, "metadata": None},
]


def write_presidio(path: Path, rows: list[dict] = PRESIDIO_ROWS) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of one `trainer` invocation in this process."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
