"""The model card shows the build's held-out scores as served, with their baselines beside them."""

from __future__ import annotations

from trainer.card import render_card


def coverage(acc: float) -> list[dict]:
    return [{"threshold": 0.0, "coverage": 1.0, "accuracy": acc}, {"threshold": 0.5, "coverage": 0.8, "accuracy": 0.9}]


def test_category_card_puts_served_accuracy_beside_fp32_and_the_baseline_per_held_out_set():
    results = {"task": "category", "labels": ["math", "law"],
               "served": {"exam": {"examples": 100, "accuracy": 0.81, "coverage": coverage(0.81),
                                   "at_routing_threshold": {"coverage": 0.8, "accuracy": 0.9}},
                          "everyday": {"examples": 364, "accuracy": 0.86, "coverage": coverage(0.86),
                                       "at_routing_threshold": {"coverage": 0.7, "accuracy": 0.95}},
                          "everyday_pii_masks": {"texts": 364, "with_any_mask": 0.0}},
               "fp32": {"exam": {"accuracy": 0.82}, "everyday": {"accuracy": 0.87}},
               "baseline": {"model": "TF-IDF + linear SVM", "train_rows": 1000, "exam": {"accuracy": 0.78},
                            "everyday": {"accuracy": 0.75}},
               "notes": ["Everyday questions: 86.0%."]}
    card = render_card(results)
    assert "| exam | 100 | 81.0% | 82.0% | 78.0% | - | 80.0% | 90.0% |" in card
    assert "| everyday | 364 | 86.0% | 87.0% | 75.0% | - | 70.0% | 95.0% |" in card
    assert "Accuracy against coverage (everyday)" in card and "- Everyday questions: 86.0%." in card
    assert "Distilled" not in card and "Teacher (not served)" not in card


def test_distilled_category_card_names_its_teacher_and_puts_the_teachers_accuracy_beside_the_served():
    results = {"task": "category", "labels": ["math", "law"],
               "teacher": {"model": "build/teacher-category", "weight": 0.5, "temperature": 2.0},
               "served": {"everyday": {"examples": 364, "accuracy": 0.8, "coverage": coverage(0.8),
                                       "at_routing_threshold": {"coverage": 0.7, "accuracy": 0.9}}},
               "fp32": {"everyday": {"accuracy": 0.81}},
               "baseline": {"model": "TF-IDF", "train_rows": 1000, "everyday": {"accuracy": 0.75}},
               "teacher_not_served": {"model": "all-MiniLM-L6-v2 fine-tuned", "everyday": {"accuracy": 0.88}}}
    card = render_card(results)
    assert "learnt the predictions of `build/teacher-category` (share of the loss 0.5, temperature 2.0)" in card
    assert "Teacher (not served): all-MiniLM-L6-v2 fine-tuned." in card
    assert "| everyday | 364 | 80.0% | 81.0% | 75.0% | 88.0% | 70.0% | 90.0% |" in card


def test_pii_card_puts_the_catch_rate_beside_the_recognizers_alone_and_lists_false_masks():
    held = {"texts": 50, "entities": 80, "caught": 0.975, "type_right": 0.99, "texts_with_false_mask": 0.04,
            "per_type": {"PERSON": {"entities": 40, "caught": 0.95}}}
    clean = {"texts": 400, "with_any_mask": 0.03, "with_person_contact_or_number_mask": 0.01}
    results = {"task": "pii", "labels": ["O", "B-PERSON", "I-PERSON"],
               "served": {"presidio_held_out_templates": held, "exam_questions_name_free": clean},
               "baseline_recognizers_only": {"presidio_held_out_templates": {**held, "caught": 0.4},
                                             "exam_questions_name_free": {**clean, "with_person_contact_or_number_mask": 0.0}}}
    card = render_card(results)
    assert "| presidio_held_out_templates | 50 | 80 | 97.5% | 40.0% | - | 99.0% | 4.0% | - |" in card
    assert "| exam_questions_name_free | 400 | 3.0% | 1.0% | 0.0% | - |" in card
    assert "| PERSON | 40 | 95.0% |" in card


def test_distilled_pii_card_puts_the_teachers_catch_rate_and_false_masks_beside_the_served():
    held = {"texts": 50, "entities": 80, "caught": 0.95, "per_type": {}}
    clean = {"texts": 400, "with_any_mask": 0.03, "with_person_contact_or_number_mask": 0.02}
    results = {"task": "pii", "labels": ["O", "B-PERSON", "I-PERSON"],
               "served": {"wnut17_real_text": held, "wnut17_entity_free": clean},
               "teacher_not_served": {"model": "all-MiniLM-L6-v2 fine-tuned",
                                      "wnut17_real_text": {**held, "caught": 0.79},
                                      "wnut17_entity_free": {**clean, "with_person_contact_or_number_mask": 0.064}}}
    card = render_card(results)
    assert "Teacher (not served): all-MiniLM-L6-v2 fine-tuned." in card
    assert "| wnut17_real_text | 50 | 80 | 95.0% | - | 79.0% |" in card
    assert "| wnut17_entity_free | 400 | 3.0% | 2.0% | - | 6.4% |" in card


def test_card_says_how_the_int8_file_was_quantized_and_on_what_it_was_calibrated():
    export = {"onnx_max_abs_diff": 1e-6, "int8_quantization": "static", "int8_batch_max_diff": 0.0,
              "int8_calibration": {"texts": 522, "sources": ["data/train.jsonl", "data/clean.jsonl"]}}
    card = render_card({"task": "category", "labels": ["math", "law"], "export": export})
    assert "| int8_quantization | static |" in card and "| int8_batch_max_diff | 0.0 |" in card
    assert "| int8_calibration | 522 texts from data/train.jsonl, data/clean.jsonl |" in card
