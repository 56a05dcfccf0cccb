"""Training settings: numbers from YAML, whole-number checks, and checks that need the whole set."""
from __future__ import annotations

import pytest
from test_fit import synthetic

from pyterrier_ce import CrossEncoder, TrainingSettings


def test_numbers_written_as_strings_are_read_as_numbers():
    # YAML 1.1 (PyYAML) reads `lr: 1e-4` as the string "1e-4"
    s = TrainingSettings().updated(lr="1e-4", head_lr="2e-3", warmup="0.1", max_steps="10")
    assert (s.lr, s.head_lr, s.warmup, s.max_steps) == (1e-4, 2e-3, 0.1, 10)
    assert isinstance(s.max_steps, int)


@pytest.mark.parametrize("bad", [dict(train_batch_size=2.5), dict(group_size="four"), dict(lr=True),
                                 dict(max_steps=0), dict(lr=float("nan")), dict(epochs=None)])
def test_values_that_cannot_train_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        TrainingSettings().updated(**bad)


def test_checkpoint_settings_may_come_half_from_the_constructor_half_from_fit(tiny_model_dir, tmp_path):
    candidates, qrels = synthetic(8)
    ce = CrossEncoder(str(tiny_model_dir), max_length=32, device="cpu", checkpoint_every=1, max_steps=1,
                      train_batch_size=4)
    ce.fit(candidates, qrels, checkpoint_dir=str(tmp_path / "run"))
    assert (tmp_path / "run" / "last" / "trainer_state.json").exists()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ce.fit(candidates, qrels)  # checkpoint_every still set, no folder anywhere
