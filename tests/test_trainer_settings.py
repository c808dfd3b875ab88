"""The dataset-size training rules and the flags that override them."""

import dataclasses

import pytest

from trainer.settings import TrainingOverrides, UsageError, apply_overrides, settings_for


@pytest.mark.parametrize(
    ("n", "epochs", "batch", "lr", "wd", "warmup", "strategy", "steps", "patience"),
    [
        (1, 2, 4, 1e-5, 0.15, 0.1, "epoch", None, 1),
        (999, 2, 4, 1e-5, 0.15, 0.1, "epoch", None, 1),
        (1000, 3, 8, 2e-5, 0.1, 0.06, "steps", 100, 2),
        (4999, 3, 8, 2e-5, 0.1, 0.06, "steps", 100, 2),
        (5000, 4, 16, 3e-5, 0.05, 0.03, "steps", 200, 3),
        (100_000, 4, 16, 3e-5, 0.05, 0.03, "steps", 200, 3),
    ],
)
def test_rules_switch_at_1000_and_5000_rows(n, epochs, batch, lr, wd, warmup, strategy, steps, patience):
    s = settings_for(n)
    assert (s.epochs, s.batch_size, s.learning_rate, s.weight_decay, s.warmup_ratio) == (epochs, batch, lr, wd, warmup)
    assert (s.eval_strategy, s.eval_steps, s.patience) == (strategy, steps, patience)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings_for(10).epochs = 5


def test_every_field_has_an_override_flag():
    fields = {f.name for f in dataclasses.fields(settings_for(10))}
    assert fields == {f.name for f in dataclasses.fields(TrainingOverrides)}


def test_unset_overrides_keep_the_rule_and_set_ones_replace_it():
    s = apply_overrides(settings_for(3000), TrainingOverrides(learning_rate=5e-5, max_steps=7))
    assert s.learning_rate == 5e-5 and s.max_steps == 7
    assert s.batch_size == 8 and s.eval_steps == 100


def test_eval_steps_alone_switches_a_per_epoch_rule_to_steps():
    s = apply_overrides(settings_for(10), TrainingOverrides(eval_steps=5))
    assert (s.eval_strategy, s.eval_steps) == ("steps", 5)


def test_per_epoch_override_drops_the_step_interval():
    s = apply_overrides(settings_for(3000), TrainingOverrides(eval_strategy="epoch"))
    assert (s.eval_strategy, s.eval_steps) == ("epoch", None)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        (TrainingOverrides(learning_rate=0), "--learning-rate"),
        (TrainingOverrides(batch_size=-1), "--batch-size"),
        (TrainingOverrides(warmup_ratio=1.0), "--warmup-ratio"),
        (TrainingOverrides(weight_decay=-0.1), "--weight-decay"),
        (TrainingOverrides(max_steps=0), "--max-steps"),
        (TrainingOverrides(eval_strategy="steps", eval_steps=0), "--eval-steps"),
    ],
)
def test_impossible_values_name_their_flag(overrides, flag):
    with pytest.raises(UsageError, match=flag):
        apply_overrides(settings_for(10), overrides)
