"""`trainer base`: an untrained ModernBERT with a byte-level BPE tokenizer trained on local text, or with a
pretrained teacher's tokenizer and word embeddings.

This is how tests and offline machines get a ModernBERT without the Hugging Face Hub. The tokenizer's
post-processor adds ``[CLS] ... [SEP]`` itself, so ``tokenizer.json`` alone encodes exactly as the
model expects (the sidecar reads it with ``tokenizers`` only).

With ``--embeddings-from TEACHER`` (any Hugging Face encoder, e.g. all-MiniLM-L6-v2) the student takes the
teacher's tokenizer and starts from its word embeddings, reduced to the student's width by PCA: words our
own corpus never shows still start where a pretrained model put them, and `trainer pretrain --teacher`
can then match the teacher token by token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


@dataclass(frozen=True)
class BaseSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    local_attention: int


SIZES: dict[str, BaseSize] = {
    # Trains in seconds on a CPU: for tests and smoke runs.
    "tiny": BaseSize(2048, 64, 96, 2, 2, 512, 64),
    # Small enough to train on a laptop CPU and ship in git as INT8 ONNX (a few MB).
    "small": BaseSize(8192, 256, 384, 4, 4, 512, 128),
    # Half as deep again with a wider feed-forward: about 1.7x small's compute per token, for when accuracy
    # pays for the latency (docs/training.md has the measured trade-off).
    "medium": BaseSize(8192, 256, 512, 6, 4, 512, 128),
}


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file and line."""


def iter_corpus(files: Iterable[str | Path]) -> Iterator[str]:
    """Texts from plain-text files (a line each) or JSON/JSONL files with `text` or `full_text` fields."""
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise CorpusError(f"{path}: no such file")
        if path.suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: not valid JSON ({e})") from e
            for i, row in enumerate(rows if isinstance(rows, list) else [rows]):
                yield _row_text(row, path, i + 1)
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield _row_text(json.loads(line), path, i)
                        except json.JSONDecodeError as e:
                            raise CorpusError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        else:
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield line.rstrip("\n")


def _row_text(row: object, path: Path, line: int) -> str:
    if isinstance(row, dict):
        for key in ("text", "full_text"):
            if isinstance(row.get(key), str):
                return row[key]
    raise CorpusError(f"{path}:{line}: expected an object with a 'text' or 'full_text' string")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (ModernBERT's scheme) whose post-processor adds CLS/SEP."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def build_base(size: str, corpus: list[str | Path] | None, output: str | Path, seed: int = 42,
               embeddings_from: str | None = None) -> Path:
    """Write an untrained ModernBERT (masked-LM weights) and its tokenizer to `output`."""
    import torch
    from transformers import ModernBertForMaskedLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if embeddings_from:
        fast, embeddings = teacher_vocabulary(embeddings_from, spec.hidden_size)
    else:
        fast, embeddings = own_tokenizer(corpus or [], spec), None
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(modernbert_config(spec, fast))
    if embeddings is not None:
        model.get_input_embeddings().weight.data.copy_(embeddings)
    model.save_pretrained(out)
    return out


def own_tokenizer(corpus: list[str | Path], spec: BaseSize):
    """A byte-level BPE tokenizer trained on `corpus`, as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    texts = list(iter_corpus(corpus))
    if not texts:
        raise CorpusError(f"{', '.join(map(str, corpus)) or 'no corpus given'}: no text found")
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts, spec.vocab_size), unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")


def teacher_vocabulary(teacher: str, width: int):
    """The teacher's fast tokenizer and its word embeddings projected to `width` by PCA (or zero-padded
    when the teacher is narrower): the directions that vary most between words are the ones kept."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from trainer.run_steps import BaseModelError, load_pretrained

    tokenizer = load_pretrained(teacher, AutoTokenizer.from_pretrained)
    if not tokenizer.is_fast or tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise BaseModelError(f"{teacher}: needs a fast tokenizer with mask and pad tokens to serve as a student's vocabulary")
    weights = load_pretrained(teacher, AutoModel.from_pretrained).get_input_embeddings().weight.detach().float()
    centred = weights - weights.mean(dim=0)
    if centred.shape[1] <= width:
        return tokenizer, torch.nn.functional.pad(centred, (0, width - centred.shape[1]))
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return tokenizer, centred @ v[:width].T


def modernbert_config(spec: BaseSize, tokenizer):
    from transformers import ModernBertConfig

    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
           for name in ("pad_token", "cls_token", "sep_token")}
    return ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        local_attention=spec.local_attention,
        pad_token_id=ids["pad_token"],
        bos_token_id=ids["cls_token"],
        eos_token_id=ids["sep_token"],
        cls_token_id=ids["cls_token"],
        sep_token_id=ids["sep_token"],
        # Mean pooling: a model trained from scratch on little data learns far faster from the average of
        # all token states than from [CLS] alone (ModernBERT's default, tuned for its long pretraining).
        classifier_pooling="mean",
    )
