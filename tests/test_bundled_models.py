"""The bundled models as served: a request's decision does not depend on the requests batched beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.served import served_router

MODELS = Path(__file__).resolve().parents[1] / "models"
PROSE = ("The committee reviewed the shipping schedule and the open questions about pricing. " * 12).strip()
PROMPT = f"{PROSE} Please forward the invoice to Maria Keller, maria.keller@example.net, +49 30 1234 5678. {PROSE}"
NEIGHBOURS = [
    "Hi",
    "ZX-99 ### 0000 %%%% " * 60,
    "我的名字是张伟，电话13800138000，住在北京市朝阳区。" * 8,
    "What is the derivative of x^3 at x = 2? Which of the following is true? (A) 12 (B) 6 (C) 8 (D) 3",
    "Dear Mr. O'Brien, your card 4111 1111 1111 1111 expires 09/29; call 0800 123 456. " * 10,
]


@pytest.fixture(scope="module")
def engine():
    if not (MODELS / "pii" / "model.int8.onnx").exists():
        pytest.skip("bundled models not in this checkout")
    with served_router(category=MODELS / "category", pii=MODELS / "pii", runtime="onnx-int8") as router:
        yield router.engine


# Float noise between kernel paths stays far below this; dynamic INT8 moved scores by about 1e-3.
SCORE_TOLERANCE = 1e-5


def test_bundled_pii_model_finds_the_same_spans_and_scores_alone_and_batched(engine):
    alone = engine.detect_pii_many([PROMPT])[0].spans
    assert {s.label for s in alone} >= {"PERSON", "EMAIL_ADDRESS"}
    for at in (0, len(NEIGHBOURS)):
        batched = engine.detect_pii_many(NEIGHBOURS[:at] + [PROMPT] + NEIGHBOURS[at:])[at].spans
        assert [(s.label, s.start, s.end) for s in batched] == [(s.label, s.start, s.end) for s in alone]
        assert [s.score for s in batched] == pytest.approx([s.score for s in alone], abs=SCORE_TOLERANCE)


def test_bundled_category_model_gives_the_same_probabilities_alone_and_batched(engine):
    question = "What are the side effects of ibuprofen?"
    alone = engine.classify_many([question])[0]
    batched = engine.classify_many([*NEIGHBOURS, question])[-1]
    assert batched.label == alone.label and set(batched.scores) == set(alone.scores)
    assert batched.scores == pytest.approx(alone.scores, abs=SCORE_TOLERANCE)
