"""Training on 2 CPU processes (DDP, gloo) follows the same path as one process with the same
global batch: the same losses and, up to float rounding, the same weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_fit import synthetic

from pyterrier_ce import CrossEncoder

REPO = Path(__file__).resolve().parents[1]

# The same settings on both sides; the global batch is 8 groups a step: 8 x 1 process, 4 x 2.
# Dropout off, so that the processes' different dropout masks do not enter the comparison.
SETTINGS = dict(max_length=32, group_size=4, max_steps=6, lr=2e-3, head_lr=None, precision="fp32", dropout=0.0,
                seed=0, device="cpu", checkpoint_every=3)

_SCRIPT = textwrap.dedent("""
    # Run by `python -m torch.distributed.run --nproc_per_node 2` (what `accelerate launch` runs too):
    # every process runs this same script; Accelerate picks up the process group from the env.
    import json, os, sys
    import pandas as pd
    from pyterrier_ce import CrossEncoder

    model, data, out = sys.argv[1:4]
    settings = pd.read_pickle(f"{data}/settings.pkl")
    ce = CrossEncoder(model, **settings, train_batch_size=4, checkpoint_dir=f"{out}/run")
    ce.fit(pd.read_pickle(f"{data}/candidates.pkl"), pd.read_pickle(f"{data}/qrels.pkl"))
    ce.save_pretrained(f"{out}/model")  # called on every process; only the main one writes
    rank = int(os.environ["RANK"])
    with open(f"{out}/loss-{rank}.json", "w") as f:
        json.dump(ce.history.frame("step")["loss"].tolist(), f)
""")


def launch_two(script: str, candidates: pd.DataFrame, qrels: pd.DataFrame, model: Path, data: Path, out: Path) -> None:
    """Runs ``script`` in 2 processes under torch.distributed.run, with the data pickled into ``data``."""
    candidates.to_pickle(data / "candidates.pkl")
    qrels.to_pickle(data / "qrels.pkl")
    (data / "launched.py").write_text(script)
    # one thread a process: 2 processes on the CPU cores, and sums in a fixed order
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(data / "launched.py"), str(model), str(data), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    candidates, qrels = synthetic(48)
    pd.to_pickle(SETTINGS, tmp_path / "settings.pkl")
    out = tmp_path / "ddp"
    launch_two(_SCRIPT, candidates, qrels, tiny_model_dir, tmp_path, out)

    single = CrossEncoder(str(tiny_model_dir), **SETTINGS, train_batch_size=8, checkpoint_dir=str(tmp_path / "one"))
    single.fit(candidates, qrels)
    one_loss = single.history.frame("step")["loss"].to_numpy()

    # Every process logs the loss averaged over both, so the same numbers.
    rank0, rank1 = (json.loads((out / f"loss-{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    # Losses: the same groups and weights at each step; only the order of float sums differs
    # (a gradient all-reduce instead of one backward over 8 groups), ~1e-7 relative in fp32.
    np.testing.assert_allclose(rank0, one_loss, rtol=1e-5)

    # Weights: Adam divides each update by sqrt(v), so the rounding noise (~1e-7 relative) of
    # near-zero gradient coordinates becomes update differences of up to ~lr. Some tensors have a
    # gradient that is exactly zero in exact arithmetic, because a softmax ignores a shift of all
    # its inputs: classifier.bias under infonce, the attention key biases. Only noise moves them
    # (keys: ~1e-7; classifier.bias: ~5e-4, as Adam scales noise up to ~lr), so they are held to
    # the absolute bound alone. Every tensor that training really moved (by > 1e-4) must match to
    # 5 % of its own change; measured: at most 1.5 % (bert.pooler.dense.bias).
    ddp = load_file(out / "model" / "model.safetensors")
    ours = {k: v for k, v in single.model.state_dict().items() if k in ddp}
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert ours.keys() == ddp.keys()
    worst = max(((ddp[k] - ours[k]).norm() / (ours[k] - start[k]).norm()).item()
                for k in ours if k in start and k != "classifier.bias" and (ours[k] - start[k]).abs().max() > 1e-4)
    diff = max((ddp[k] - ours[k]).abs().max().item() for k in ddp)
    moved = max((ours[k] - start[k]).abs().max().item() for k in ours if k in start)
    print(f"2 processes vs 1: loss max rel. diff {np.max(np.abs(np.array(rank0) / one_loss - 1)):.2e}, "
          f"max weight diff {diff:.2e} (training moved weights by up to {moved:.2e}), "
          f"worst tensor diff relative to its training change {worst:.2%}")
    assert worst < 0.05 and diff < 2e-3

    # Only the main process wrote the log, the model and the checkpoints; each process its RNG state.
    run = out / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("start") == 1 and [r["step"] for r in log if r["event"] == "step"] == [
        1, 2, 3, 4, 5, 6]
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["groups_per_step"] == 8 and state["step"] == 6
    assert {p.name for p in (run / "last").iterdir()} >= {"rng.pt", "rng-1.pt", "model.safetensors"}
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("loss")) == ["model", "run"]
    assert sorted(p.name for p in run.iterdir()) == ["last", "log.jsonl"]
    torch.testing.assert_close(load_file(run / "last" / "model.safetensors")["classifier.weight"],
                               ddp["classifier.weight"], rtol=0, atol=0)


def test_fewer_groups_than_processes_is_refused_rather_than_hanging(tiny_model_dir, tmp_path):
    candidates, qrels = synthetic(1)  # one usable query for two processes
    candidates.to_pickle(tmp_path / "candidates.pkl")
    qrels.to_pickle(tmp_path / "qrels.pkl")
    pd.to_pickle(SETTINGS, tmp_path / "settings.pkl")
    (tmp_path / "train.py").write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(tmp_path / "train.py"), str(tiny_model_dir), str(tmp_path), str(tmp_path / "ddp")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("two processes training one query group hung")
    assert done.returncode != 0
    assert "1 usable training queries for 2 processes" in done.stderr


_TEACHER_SCRIPT = textwrap.dedent("""
    # Each process scores a share of the queries with the teacher, once; all get every score.
    import json, os, sys
    import numpy as np
    import pandas as pd
    import pyterrier as pt
    from pyterrier_ce import CrossEncoder
    from pyterrier_ce.candidates import Candidates
    from pyterrier_ce.teachers import PipelineTeacher

    model, data, out = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    scored = []

    def score(row):
        scored.append(row["docno"])
        return float(len(row["text"]) % 7) + int(row["docno"].split("d")[-1]) / 10

    teacher = PipelineTeacher(pt.apply.doc_score(score), cache_dir=f"{out}/cache", key="counting-v1")
    candidates = pd.read_pickle(f"{data}/candidates.pkl")
    scores = teacher.scores_of(Candidates.from_frame(candidates))
    first = len(scored)
    ce = CrossEncoder(model, max_length=32, group_size=4, max_steps=1, device="cpu", verbose=False)
    ce.fit(candidates, pd.read_pickle(f"{data}/qrels.pkl"), objective="margin_mse", teacher=teacher,
           teacher_cache=f"{out}/cache")  # a frame: scored again in shares, from each share's cache
    with open(f"{out}/scored-{rank}.json", "w") as f:
        json.dump({"first": first, "after_fit": len(scored), "scores": scores.tolist()}, f)
""")


def test_two_processes_share_a_pipeline_teachers_scoring(tiny_model_dir, tmp_path):
    from pyterrier_ce.candidates import Candidates

    candidates, qrels = synthetic(10)
    out = tmp_path / "out"
    launch_two(_TEACHER_SCRIPT, candidates, qrels, tiny_model_dir, tmp_path, out)
    runs = [json.loads((out / f"scored-{rank}.json").read_text()) for rank in (0, 1)]
    assert runs[0]["first"] + runs[1]["first"] == len(candidates)  # every pair scored once, in all
    assert runs[0]["first"] == runs[1]["first"] == len(candidates) // 2  # 5 queries each
    assert [r["after_fit"] for r in runs] == [r["first"] for r in runs]  # fit read each share's cache
    compact = Candidates.from_frame(candidates)
    frame = compact.frame(np.arange(len(compact)))
    expected = [float(len(t) % 7) + int(d.split("d")[-1]) / 10
                for t, d in zip(candidates.set_index("docno").loc[frame["docno"], "text"], frame["docno"])]
    assert runs[0]["scores"] == runs[1]["scores"] == pytest.approx(expected)
    shards = sorted(p.name for p in (out / "cache").glob("*/shard-*") if p.is_dir())
    assert shards == ["shard-0-of-2", "shard-1-of-2"]  # each process's own score cache
    assert not [p for parts in (out / "cache").glob("*.parts") for p in parts.iterdir()]  # part files removed
