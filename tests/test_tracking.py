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
    assert [e.step for e in scalars.Scalars("valid/nDCG_at_10")] == [2, 3]
    assert "train/groups_per_s" in scalars.Tags()["scalars"]


def test_mlflow_gets_the_loss_and_validation_in_a_local_store(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    candidates, qrels = synthetic(12)
    ce = make(tiny_model_dir, max_steps=3, verbose=False)
    ce.fit(candidates, qrels, candidates.head(18), qrels, eval_every=2, report_to="mlflow",
           tracking_dir=str(tmp_path / "tracking"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pyterrier-ce").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert losses == pytest.approx(ce.history.frame("step")["loss"].tolist(), rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid/nDCG_at_10")] == [2, 3]
    assert "infonce" in run.data.params["objective"]
    assert run.info.status == "FINISHED"


def test_wandb_writes_an_offline_run_in_the_tracking_dir(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    candidates, qrels = synthetic(12)
    ce = make(tiny_model_dir, max_steps=3, verbose=False)
    ce.fit(candidates, qrels, candidates.head(18), qrels, eval_every=2, report_to=["wandb"],
           tracking_dir=str(tmp_path / "tracking"))
    runs = list((tmp_path / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the run file holds protobuf records; each logged item is its key then its value as JSON.
    # wandb's service process writes it: give it a moment to finish after the run is closed.
    import time

    run_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 30
    while run_file.read_bytes().count(b"train/loss") < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    record = run_file.read_bytes()

    def logged(key: str) -> list:
        marker = b"\x12" + bytes([len(key)]) + key.encode() + b"\x82\x01"
        values, at = [], record.find(marker)
        while at >= 0:
            start = at + len(marker) + 1
            values.append(json.loads(record[start:start + record[start - 1]]))
            at = record.find(marker, start)
        return values

    losses = ce.history.frame("step")["loss"].tolist()
    values = logged("train/loss")  # each step's history record, and the run summary updated after it
    in_order = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    assert in_order == pytest.approx(losses, rel=1e-6)
    assert len(logged("valid/nDCG_at_10")) >= 2
    assert b"infonce" in record  # the run's settings as its config


def test_measure_names_are_ones_every_tracker_takes():
    from pyterrier_ce.training.tracking import tracked_name

    assert tracked_name("nDCG@10") == "nDCG_at_10"
    assert tracked_name("RR(rel=2)@10") == "RR_rel_2_at_10"
    assert tracked_name("AP") == "AP"
