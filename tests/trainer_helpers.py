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


FAST = ["--max-steps", "2", "--eval-steps", "2", "--logging-steps", "2"]
"""Trainer flags for a run of two steps: proves the path, not the accuracy."""
WORDPIECE_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(texts: list[str]):
    """A BERT-style `tokenizers` object: lowercasing normalizer, WordPiece, `[CLS] ... [SEP]` post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=WORDPIECE_SPECIAL))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return tok


def save_tiny_bert(out: Path, tokenizer, hidden_size: int = 32) -> Path:
    """An untrained one-layer BertModel (all-MiniLM-L6-v2 in shape) with `tokenizer` beside it."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def bert_tokenizer_fast(texts: list[str]):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(tokenizer_object=wordpiece_tokenizer(texts), unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
