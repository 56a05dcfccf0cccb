"""Experiment tracking through Accelerate's trackers: TensorBoard, written offline."""
from __future__ import annotations

import pytest
from test_fit import make, synthetic


def test_tensorboard_gets_the_loss_and_validation_offline(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    candidates, qrels = synthetic(12)
    ce = make(tiny_model_dir, max_steps=3, verbose=False)
    ce.fit(candidates, qrels, candidates.head(18), qrels, eval_every=2, report_to="tensorboard",
           tracking_dir=str(tmp_path / "tb"))
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    losses = [e.value for e in scalars.Scalars("train/loss")]
    assert losses == pytest.approx(ce.history.frame("step")["loss"].tolist(), rel=1e-6)
    assert [e.step for e in scalars.Scalars("valid/nDCG@10")] == [2, 3]
    assert "train/groups_per_s" in scalars.Tags()["scalars"]
