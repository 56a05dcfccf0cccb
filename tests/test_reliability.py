"""Reliability: bad inputs get clear errors or documented handling, crashes (SIGKILL, NaN) lose
nothing, and only safe formats are loaded."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_fit import make, synthetic

from pyterrier_ce import CrossEncoder
from pyterrier_ce.training import CheckpointError, NonFiniteLoss

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_task():
    return synthetic(12)


def _weights(ce) -> dict:
    return {k: v.detach().clone() for k, v in ce.model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# -- bad inputs: scoring --------------------------------------------------------------------


def test_empty_strings_are_scored_with_a_warning(tiny_ce, pairs_frame):
    frame = pairs_frame.copy()
    frame.loc[1, "text"] = ""
    frame.loc[3, "text"] = "   "
    with pytest.warns(UserWarning, match="2 rows have an empty `text`; they are scored as given"):
        out = tiny_ce(frame)
    assert len(out) == len(frame) and out["score"].notna().all()
    frame.loc[0, "query"] = ""
    with pytest.warns(UserWarning, match="1 rows have an empty `query`"):
        tiny_ce(frame)


def test_missing_query_values_name_an_example(tiny_ce, pairs_frame):
    frame = pairs_frame.copy()
    frame.loc[4, "query"] = None
    with pytest.raises(ValueError, match=r"1 rows have no `query` \(NaN/None\), e.g. \(qid, docno\) \('q2', 'd5'\); "
                                         r"fill or drop them before reranking"):
        tiny_ce(frame)


def test_int_qids_and_docnos_are_scored_like_strings(tiny_ce, pairs_frame):
    as_str = tiny_ce(pairs_frame)
    ints = pairs_frame.assign(qid=pairs_frame["qid"].str[1:].astype(int), docno=pairs_frame["docno"].str[1:].astype(int))
    as_int = tiny_ce(ints)
    assert as_int["rank"].tolist() == as_str["rank"].tolist()
    assert as_int["docno"].astype(str).radd("d").tolist() == as_str["docno"].tolist()
    np.testing.assert_allclose(as_int["score"], as_str["score"], atol=1e-6)


# -- bad inputs: fit ------------------------------------------------------------------------


def test_fit_refuses_missing_values(tiny_model_dir, small_task):
    candidates, qrels = small_task
    ce = make(tiny_model_dir, max_steps=1)
    broken = candidates.copy()
    broken.loc[7, "text"] = np.nan
    with pytest.raises(ValueError, match=r"1 rows have no `text` \(NaN/None\), e.g. \(qid, docno\) \('q1', 'q1d1'\); "
                                         r"fill or drop them before training"):
        ce.fit(broken, qrels)
    broken = candidates.assign(query=candidates["query"].where(candidates["qid"] != "q3", None))
    with pytest.raises(ValueError, match="6 rows have no `query`"):
        ce.fit(broken, qrels)


def test_fit_refuses_empty_frames(tiny_model_dir, small_task):
    candidates, qrels = small_task
    ce = make(tiny_model_dir, max_steps=1)
    with pytest.raises(ValueError, match="train is empty .*check that the first stage retrieved"):
        ce.fit(candidates.iloc[:0], qrels)
    with pytest.raises(ValueError, match="valid is empty"):
        ce.fit(candidates, qrels, candidates.iloc[:0], qrels)
    with pytest.raises(ValueError, match="No usable training query .*share qids and docnos"):
        ce.fit(candidates, qrels.iloc[:0])


def test_fit_leaves_out_empty_texts_and_queries(tiny_model_dir, small_task):
    candidates, qrels = small_task
    frame = candidates.copy()
    frame.loc[frame["docno"] == "q0d3", "text"] = ""
    frame.loc[frame["docno"] == "q2d2", "text"] = " "  # q2's only positive: q2 has none left
    frame.loc[frame["qid"] == "q5", "query"] = ""
    ce = make(tiny_model_dir, max_steps=2, group_size=6)
    with pytest.warns(UserWarning, match=r"2 training candidates have an empty `text`, e.g. \('q0', 'q0d3'\)"):
        ce.fit(frame, qrels)
    report = ce.history.frame("start")["sampling"].iloc[0]
    assert "10 of 12 training queries used" in report
    assert "1 skipped: empty query text" in report
    assert "1 skipped: no judged-relevant document" in report
    assert "2 candidates with empty text left out" in report


def test_duplicate_candidates_are_dropped_with_a_warning(tiny_model_dir, small_task):
    from pyterrier_ce.sampling import GroupSampler

    candidates, qrels = small_task
    doubled = pd.concat([candidates, candidates[candidates["qid"] == "q0"].assign(rank=99)], ignore_index=True)
    with pytest.warns(UserWarning, match=r"6 training candidates repeat a \(qid, docno\) pair, e.g. \('q0', 'q0d0'\)"):
        sampler = GroupSampler(doubled, qrels, group_size=6, seed=0)
    assert sampler.report.duplicates == 6 and "6 duplicate (qid, docno) rows left out" in str(sampler.report)
    for epoch in range(3):
        for group in sampler.epoch(epoch):
            assert len(set(group.docnos)) == len(group.docnos) == 6
    # fit takes the same path, and trains as on the frame without duplicates
    with pytest.warns(UserWarning, match="repeat a"):
        twice = make(tiny_model_dir, max_steps=2, precision="fp32").fit(doubled, qrels)
    once = make(tiny_model_dir, max_steps=2, precision="fp32").fit(candidates, qrels)
    _assert_same_weights(_weights(twice), _weights(once))


def test_int_qids_match_str_qrels_in_fit_and_validation(tiny_model_dir, small_task):
    candidates, qrels = small_task
    ints = candidates.assign(qid=candidates["qid"].str[1:].astype(int))
    int_qrels = qrels.assign(qid=qrels["qid"].str[1:].astype(int))
    str_qrels = qrels.assign(qid=qrels["qid"].str[1:])
    settings = dict(max_steps=3, eval_every=3, precision="fp32")
    a = make(tiny_model_dir, **settings).fit(ints, str_qrels, ints, str_qrels)
    b = make(tiny_model_dir, **settings).fit(ints.assign(qid=ints["qid"].astype(str)), int_qrels,
                                             ints.assign(qid=ints["qid"].astype(str)), str_qrels)
    assert "12 of 12 training queries used" in a.history.frame("start")["sampling"].iloc[0]
    np.testing.assert_allclose(a.history.frame("step")["loss"], b.history.frame("step")["loss"], rtol=1e-6)
    assert a.history.frame("valid")["value"].iloc[0] == pytest.approx(b.history.frame("valid")["value"].iloc[0])
    _assert_same_weights(_weights(a), _weights(b))


def test_unknown_queries_positive_less_queries_and_short_groups_are_reported(tiny_model_dir, small_task):
    candidates, qrels = small_task
    extra = pd.DataFrame([("nowhere", "x", 1), ("elsewhere", "y", 2)], columns=["qid", "docno", "label"])
    judged = pd.concat([qrels[qrels["qid"] != "q4"], extra], ignore_index=True)
    # 6 candidates a query: groups of 10 are short groups of 6, masked in the loss
    ce = make(tiny_model_dir, max_steps=2, group_size=10)
    ce.fit(candidates, judged)
    report = ce.history.frame("start")["sampling"].iloc[0]
    assert "11 of 12 training queries used" in report
    assert "1 skipped: no judged-relevant document among their candidates" in report
    assert "qrels of 2 queries without candidates unused" in report
    assert "11 have fewer candidates than group_size (smaller groups)" in report
    assert np.isfinite(ce.history.frame("step")["loss"]).all()


def test_train_max_length_beyond_the_model_limit(tiny_model_dir, small_task):
    candidates, qrels = small_task
    ce = make(tiny_model_dir, max_steps=1)
    with pytest.raises(ValueError, match="train_max_length=1000 is beyond this model's limit of 128 tokens: "
                                         "pass train_max_length=128 or less"):
        ce.fit(candidates, qrels, train_max_length=1000)


# -- corrupt checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint(tiny_model_dir, small_task, tmp_path_factory) -> Path:
    candidates, qrels = small_task
    folder = tmp_path_factory.mktemp("good-checkpoint")
    # a 4-step run killed after its checkpoint at step 2: what a resume continues
    from pyterrier_ce.training.steps import StepRunner

    real = StepRunner.forward_backward

    def killed_at_step_3(self, groups, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, groups, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StepRunner, "forward_backward", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            make(tiny_model_dir, max_steps=4, checkpoint_every=2, checkpoint_dir=str(folder)).fit(candidates, qrels)
    return folder


class _RunsCode:
    """A pickle that would create a file if it were unpickled with code execution allowed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage, match", [
    ("truncated weights", "model.safetensors is unreadable or corrupt"),
    ("garbage state", "trainer_state.json is unreadable or corrupt"),
    ("state without keys", r"trainer_state.json is unreadable or corrupt \(KeyError"),
    ("truncated optimizer", "optimizer.pt is unreadable or corrupt"),
    ("code in a pickle", "optimizer.pt is unreadable or corrupt"),
    ("another model's weights", "its model.safetensors does not fit this model"),
])
def test_corrupt_checkpoints_are_named(tiny_model_dir, small_task, good_checkpoint, tmp_path, damage, match):
    candidates, qrels = small_task
    shutil.copytree(good_checkpoint, tmp_path / "run")
    last = tmp_path / "run" / "last"
    marker = tmp_path / "pwned"
    if damage == "truncated weights":
        _truncate(last / "model.safetensors")
    elif damage == "garbage state":
        (last / "trainer_state.json").write_text("{step: ")
    elif damage == "state without keys":
        (last / "trainer_state.json").write_text('{"step": 2}')
    elif damage == "truncated optimizer":
        _truncate(last / "optimizer.pt")
    elif damage == "code in a pickle":
        with open(last / "optimizer.pt", "wb") as f:
            pickle.dump(_RunsCode(str(marker)), f)
    else:
        from safetensors.torch import save_file

        save_file({"other.weight": torch.zeros(3, 3)}, last / "model.safetensors")
    ce = make(tiny_model_dir, max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path / "run"), resume=True)
    with pytest.raises(CheckpointError, match=f"Cannot resume from {last}: {match}") as info:
        ce.fit(candidates, qrels)
    assert "point checkpoint_dir elsewhere" in str(info.value)
    assert not marker.exists()  # weights_only: the pickle's code never ran


def test_resume_after_a_crash_between_the_two_renames(tiny_model_dir, small_task, good_checkpoint, tmp_path):
    """A kill between "last -> .last.old-PID" and ".last.tmp -> last" leaves no last/: the old one
    is complete and is put back, rather than training silently starting from scratch."""
    candidates, qrels = small_task
    shutil.copytree(good_checkpoint, tmp_path / "run")
    os.replace(tmp_path / "run" / "last", tmp_path / "run" / ".last.old-12345")
    (tmp_path / "run" / ".last.tmp").mkdir()  # an unfinished new one
    ce = make(tiny_model_dir, max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path / "run"), resume=True)
    ce.fit(candidates, qrels)
    assert ce.history.frame("resume")["step"].tolist() == [2]
    assert ce.history.frame("step")["step"].tolist() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last", "log.jsonl"]


# -- crash safety ----------------------------------------------------------------------------

_TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from pyterrier_ce import CrossEncoder
    from pyterrier_ce.training.steps import StepRunner

    model, data, checkpoints = sys.argv[1:4]
    real_step = StepRunner.forward_backward

    def slow_step(self, groups, step):  # the tiny model trains too fast to be caught mid-run
        time.sleep(0.15)
        return real_step(self, groups, step)

    StepRunner.forward_backward = slow_step
    ce = CrossEncoder(model, **pd.read_pickle(f"{data}/settings.pkl"), checkpoint_dir=checkpoints)
    ce.fit(pd.read_pickle(f"{data}/candidates.pkl"), pd.read_pickle(f"{data}/qrels.pkl"))
""")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, small_task, tmp_path):
    candidates, qrels = small_task
    settings = dict(max_length=32, group_size=3, train_batch_size=2, lr=2e-3, seed=0, max_steps=30,
                    checkpoint_every=1, precision="fp32")
    candidates.to_pickle(tmp_path / "candidates.pkl")
    qrels.to_pickle(tmp_path / "qrels.pkl")
    pd.to_pickle(settings, tmp_path / "settings.pkl")
    (tmp_path / "train.py").write_text(_TRAIN_SCRIPT)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(tmp_path / "train.py"), str(tiny_model_dir), str(tmp_path), str(run)],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run / "last" / "trainer_state.json"
    deadline = time.monotonic() + 120
    killed_after = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                killed_after = json.loads(state.read_text())["step"]
            except (FileNotFoundError, ValueError):
                killed_after = None  # not written yet (the rename makes it appear whole)
            if killed_after is not None and killed_after >= 5:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and killed_after is None:
            process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert killed_after is not None and 5 <= killed_after < 30
    print(f"killed after step {killed_after}")

    resumed = CrossEncoder(str(tiny_model_dir), **settings, checkpoint_dir=str(run), resume=True)
    resumed.fit(candidates, qrels)
    start = resumed.history.frame("resume")["step"].iloc[0]
    print(f"resumed from step {start}")
    assert start >= killed_after  # the last complete checkpoint (maybe one written after the read)
    assert resumed.history.frame("step")["step"].tolist() == list(range(start + 1, 31))

    straight = CrossEncoder(str(tiny_model_dir), **settings, checkpoint_dir=str(tmp_path / "straight"))
    straight.fit(candidates, qrels)
    _assert_same_weights(_weights(resumed), _weights(straight), atol=1e-6)


def test_nan_loss_names_the_step_and_queries_and_keeps_best(tiny_model_dir, small_task, tmp_path):
    candidates, qrels = small_task

    class NanOnThirdStep(torch.nn.Module):
        calls = 0

        def forward(self, scores, targets, mask=None):
            NanOnThirdStep.calls += 1
            loss = -torch.log_softmax(scores.float().masked_fill(~mask, -1e4), -1)[:, 0].mean()
            return loss * float("nan") if NanOnThirdStep.calls == 3 else loss

    ce = make(tiny_model_dir, objective=NanOnThirdStep(), checkpoint_dir=str(tmp_path), max_steps=6,
              eval_every=2, checkpoint_every=2, dropout=0.3)
    with pytest.raises(NonFiniteLoss, match=r"The loss is nan at step 3 \(micro-batch 0, queries \['q\d+', 'q\d+', "
                                            r"'q\d+', 'q\d+'\]\).*best/ and last/ checkpoints were left"):
        ce.fit(candidates, qrels, candidates, qrels)
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["best_step"] == 2
    # best/ is the model of step 2, as last/ is: the failed step wrote neither
    _assert_same_weights(load_file(tmp_path / "best" / "model.safetensors"),
                         load_file(tmp_path / "last" / "model.safetensors"), atol=0)
    # the model is handed back for inspection in eval mode, with its own dropout
    assert not ce.model.training
    assert all(m.p == 0.1 for m in ce.model.modules() if isinstance(m, torch.nn.Dropout))


# -- safe formats ----------------------------------------------------------------------------


def test_a_folder_with_only_pickled_weights_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "old-model"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"old-model has no safetensors weights .*pickled pytorch_model.bin .*"
                                         r"convert it once: .*use_safetensors=False\)\.save_pretrained\(path\)"):
        CrossEncoder(str(folder))
    # the conversion the message gives works
    transformers.AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=False).save_pretrained(folder)
    assert CrossEncoder(str(folder), max_length=32).score_pairs(["q"], ["d"]).shape == (1,)


def test_remote_code_is_off_and_weights_are_safetensors_by_default(tiny_model_dir, monkeypatch):
    from pyterrier_ce import loading

    calls = []

    def spy(cls_name, real):
        def wrapper(*args, **kwargs):
            calls.append((cls_name, kwargs))
            return real(*args, **kwargs)
        return wrapper

    for name in ("AutoConfig", "AutoModelForSequenceClassification", "AutoTokenizer"):
        auto = getattr(loading, name)
        monkeypatch.setattr(auto, "from_pretrained", spy(name, auto.from_pretrained))
    CrossEncoder(str(tiny_model_dir))
    CrossEncoder.from_pretrained(tiny_model_dir)
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForSequenceClassification", "AutoTokenizer"}
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in calls)
    assert all(kwargs.get("use_safetensors") is True for name, kwargs in calls
               if name == "AutoModelForSequenceClassification")
    calls.clear()
    CrossEncoder(str(tiny_model_dir), trust_remote_code=True)
    assert all(kwargs.get("trust_remote_code") is True for _, kwargs in calls)


def test_checkpoints_hold_no_pickled_code(good_checkpoint):
    """Optimiser, scheduler and RNG states load with weights_only=True; weights are safetensors."""
    last = good_checkpoint / "last"
    assert not list(last.glob("*.bin"))
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(last / name, weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_file(last / "model.safetensors")
