"""Sharded training (FSDP) launched with the documented config, configs/accelerate/fsdp.yaml, on
2 CPU processes: the same losses and weights as one process with the same global batch;
checkpoints hold the whole model and optimiser state and a crashed run resumes exactly; the best
validated weights come back; every process ends with the plain, whole model; `pyterrier-ce run`
trains a grid under it.

Accelerate turns FSDP on only for GPU processes (CPU processes get DDP whatever the config
says), while PyTorch's FSDP2 itself runs on CPUs over gloo. So the launched script switches
Accelerate's state to FSDP when it would have ignored the plugin: everything else is the path a
GPU server takes (Accelerate's sharding of the model and optimiser, its clipping, our gathers)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_decoders import save_decoder
from test_fit import synthetic
from test_runner import (
    config,  # noqa: F401  (fixture)
    data_dir,  # noqa: F401  (fixture)
)

from pyterrier_ce import CrossEncoder
from pyterrier_ce.training.sharding import Sharding

REPO = Path(__file__).resolve().parents[1]

SETTINGS = dict(max_length=32, group_size=4, max_steps=6, lr=2e-3, head_lr=None, precision="fp32", dropout=0.0,
                seed=0, device="cpu", checkpoint_every=3, eval_every=3, verbose=False)
PAIRS = (["cat", "war", "music film", "the dog"], ["a cat sat", "war and peace", "x", "the long dog text here"])

_FSDP_ON_CPU = textwrap.dedent("""
    import accelerate.state
    from accelerate.utils import DistributedType

    _init = accelerate.state.AcceleratorState.__init__

    def fsdp_on_cpu(self, *args, **kwargs):  # what Accelerate does on GPUs (see the test module)
        _init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin

    accelerate.state.AcceleratorState.__init__ = fsdp_on_cpu
""")

_SCRIPT = _FSDP_ON_CPU + textwrap.dedent("""
    import json, os, sys
    import pandas as pd
    import torch
    from torch.distributed.tensor import DTensor
    from pyterrier_ce import CrossEncoder
    from pyterrier_ce.training.steps import StepRunner
    from pyterrier_ce.training.validation import Validator

    model, data, out = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    settings = pd.read_pickle(f"{data}/settings.pkl")
    train, qrels = pd.read_pickle(f"{data}/candidates.pkl"), pd.read_pickle(f"{data}/qrels.pkl")
    queries, texts = pd.read_pickle(f"{data}/pairs.pkl")
    # the first validation is the best: the weights of step 3 must come back after step 6
    values = iter([0.9, 0.5, 0.9, 0.5])
    Validator.evaluate = lambda self, model: next(values)

    def fit(folder, **more):
        ce = CrossEncoder(model, **settings, train_batch_size=4, checkpoint_dir=f"{out}/{folder}", **more)
        return ce.fit(train, qrels, valid=train, valid_qrels=qrels)

    ce = fit("straight")
    ce.save_pretrained(f"{out}/model")  # every process calls it; the main one writes
    report = {"loss": ce.history.frame("step")["loss"].tolist(),
              "plain": not any(isinstance(p, DTensor) for p in ce.model.parameters()),
              "scores": ce.score_pairs(queries, texts).tolist()}

    step = StepRunner.forward_backward

    def crash_at_step_5(self, groups, at):
        if at == 4:
            raise KeyboardInterrupt("simulated crash")
        return step(self, groups, at)

    StepRunner.forward_backward = crash_at_step_5
    try:
        fit("crashed")
    except KeyboardInterrupt:
        pass
    StepRunner.forward_backward = step
    values = iter([0.5])  # the resumed run validates once more, at step 6
    resumed = fit("crashed", resume=True)
    report["resumed_at"] = resumed.history.frame("resume")["step"].tolist()
    with open(f"{out}/report-{rank}.json", "w") as f:
        json.dump(report, f)
""")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 classifier (the family the FSDP config is written for)."""
    return save_decoder(tmp_path_factory.mktemp("qwen2-fsdp"), "qwen2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_with_fsdp_config(script: Path, *args: str, timeout: int = 300) -> None:
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml`` of ``script`` on 2 processes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
         "--num_processes", "2", "--main_process_port", str(_free_port()), str(script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module", params=["full", "lora"])
def sharded(request, qwen2_dir, tmp_path_factory):
    """The launched script's output folder, the training data and the settings (full
    fine-tuning, or LoRA adapters and the head)."""
    data = tmp_path_factory.mktemp(f"fsdp-{request.param}")
    out = data / "out"
    candidates, qrels = synthetic(48)
    candidates.to_pickle(data / "candidates.pkl")
    qrels.to_pickle(data / "qrels.pkl")
    settings = {**SETTINGS, "lora": request.param == "lora"}
    pd.to_pickle(settings, data / "settings.pkl")
    pd.to_pickle(PAIRS, data / "pairs.pkl")
    (data / "launched.py").write_text(_SCRIPT)
    launch_with_fsdp_config(data / "launched.py", str(qwen2_dir), str(data), str(out))
    return out, candidates, qrels, settings


def test_sharded_training_matches_one_process_with_the_same_global_batch(sharded, qwen2_dir, tmp_path):
    out, candidates, qrels, settings = sharded
    single = CrossEncoder(str(qwen2_dir), **{**settings, "eval_every": None}, train_batch_size=8,
                          checkpoint_dir=str(tmp_path / "one"))
    single.fit(candidates, qrels)
    rank0, rank1 = (json.loads((out / f"report-{r}.json").read_text()) for r in (0, 1))
    assert rank0["loss"] == rank1["loss"]
    np.testing.assert_allclose(rank0["loss"], single.history.frame("step")["loss"], rtol=1e-5)

    # The weights after step 6 (last/; the model given back is the best, of step 3): float
    # rounding differs (a reduce-scatter instead of one backward over 8 groups), which Adam can
    # scale up on coordinates whose gradient is ~0 (see test_distributed); measured: 1.4e-6.
    sharded_last = load_file(out / "straight" / "last" / "model.safetensors")
    ours = {k: v for k, v in single.model.state_dict().items()}
    assert ours.keys() >= sharded_last.keys()
    diff = max((sharded_last[k] - ours[k]).abs().max().item() for k in sharded_last)
    relative = np.max(np.abs(np.array(rank0["loss"]) / single.history.frame("step")["loss"].to_numpy() - 1))
    print(f"FSDP on 2 processes vs 1 ({'LoRA' if settings['lora'] else 'full'}): loss max rel. diff {relative:.2e}, "
          f"max weight diff {diff:.2e}")
    assert diff < 1e-4
    state = json.loads((out / "straight" / "last" / "trainer_state.json").read_text())
    assert state["sharded"] is True and state["processes"] == 2 and state["step"] == 6
    start = [json.loads(line) for line in (out / "straight" / "log.jsonl").read_text().splitlines()][0]
    assert start["memory"]["shards"] == 2
    assert start["memory"]["parameters"] == sum(p.numel() for p in single.model.parameters())


def test_every_process_gets_the_whole_best_model_back(sharded):
    out, *_ = sharded
    rank0, rank1 = (json.loads((out / f"report-{r}.json").read_text()) for r in (0, 1))
    assert rank0["plain"] and rank1["plain"]
    assert rank0["scores"] == rank1["scores"]
    saved = CrossEncoder(str(out / "model"), max_length=32, verbose=False)
    np.testing.assert_allclose(saved.score_pairs(*PAIRS), rank0["scores"], atol=1e-5)
    # the best validation was at step 3: what fit gave back (and saved) is best/, not last/
    end = [json.loads(line) for line in (out / "straight" / "log.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["best_step"] == 3
    best = CrossEncoder(str(out / "straight" / "best"), max_length=32, verbose=False)
    np.testing.assert_allclose(best.score_pairs(*PAIRS), rank0["scores"], atol=1e-6)
    name = "adapter_model.safetensors" if (out / "model" / "adapter_config.json").exists() else "model.safetensors"
    saved, kept = load_file(out / "model" / name), load_file(out / "straight" / "best" / name)
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in kept)
    last = load_file(out / "straight" / "last" / "model.safetensors")
    moved = [k for k in last if k.startswith("score.") and k in saved]  # the whole head, when not LoRA
    assert moved or name == "adapter_model.safetensors"
    assert all(not torch.equal(saved[k], last[k]) for k in moved)


def test_a_crashed_sharded_run_resumes_exactly(sharded):
    out, *_ = sharded
    report = json.loads((out / "report-0.json").read_text())
    assert report["resumed_at"] == [3]
    straight = load_file(out / "straight" / "last" / "model.safetensors")
    resumed = load_file(out / "crashed" / "last" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    optimiser = torch.load(out / "crashed" / "last" / "optimizer.pt", weights_only=True)
    state = optimiser["state"]  # keyed by parameter name, whole
    assert all(isinstance(name, str) for name in state) and any(name.startswith("score.") for name in state)
    assert state[next(iter(state))]["exp_avg"].shape == resumed[next(iter(state))].shape


def test_a_sharded_checkpoint_is_not_resumed_without_sharding(sharded, qwen2_dir, tmp_path):
    out, candidates, qrels, settings = sharded
    shutil.copytree(out / "straight", tmp_path / "run")
    ce = CrossEncoder(str(qwen2_dir), **settings, train_batch_size=8, checkpoint_dir=str(tmp_path / "run"), resume=True)
    with pytest.raises(ValueError, match=r"written under sharded training \(FSDP\)"):
        ce.fit(candidates, qrels, valid=candidates, valid_qrels=qrels)


def test_the_runner_trains_a_grid_under_the_fsdp_config(config, qwen2_dir, tmp_path):
    """The documented command: accelerate launch --config_file configs/accelerate/fsdp.yaml -m
    pyterrier_ce run CONFIG; two systems, one after the other, each sharded while it trains."""
    config = {**config, "models": [{"name": "qwen2", "backbone": str(qwen2_dir)}], "evaluate": config["evaluate"][:1]}
    config["settings"] = {**config["settings"], "train_batch_size": 1, "max_steps": 3}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "launched.py").write_text(_FSDP_ON_CPU + "import sys\nfrom pyterrier_ce.runner import run_config\n"
                                          "run_config(sys.argv[1])\n")
    launch_with_fsdp_config(tmp_path / "launched.py", str(tmp_path / "grid.yaml"))
    work = tmp_path / "work"
    results = pd.read_csv(work / "results.csv")
    assert {"qwen2-infonce-s1", "qwen2-bce-s1"} <= set(results["name"])
    for system in ("qwen2-infonce-s1", "qwen2-bce-s1"):
        log = [json.loads(line) for line in (work / "logs" / f"{system}.jsonl").read_text().splitlines()]
        assert [r["event"] for r in log].count("start") == 1 and log[0]["memory"]["shards"] == 2
        assert (work / "models" / system / "model.safetensors").exists()


def _accelerator_with(**plugin) -> SimpleNamespace:
    """What Sharding reads of an accelerator: its FSDP plugin and device (no process group)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(**plugin)),
                           device=torch.device("cpu"))


def test_a_model_without_named_layers_is_refused_with_the_setting_to_add(tiny_model_dir):
    model = CrossEncoder(str(tiny_model_dir), verbose=False).model  # transformers names no BERT layer class
    with pytest.raises(ValueError, match="`fsdp_transformer_layer_cls_to_wrap: BertLayer`"):
        Sharding(model, _accelerator_with(fsdp_version=2, auto_wrap_policy="transformer_based_wrap"))
    Sharding(model, _accelerator_with(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                      transformer_cls_names_to_wrap=["BertLayer"]))
    with pytest.raises(ValueError, match="set `fsdp_version: 2`"):
        Sharding(model, _accelerator_with(fsdp_version=1))


class _Tied(torch.nn.Module):
    """Tied input and output weights, and a buffer that no state dict holds."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return self.out(self.embed(x) * self.scale)


def test_the_plain_model_is_rebuilt_from_whole_weights_with_its_ties_and_buffers():
    model = _Tied()
    sharding = Sharding(model, _accelerator_with(fsdp_version=2))
    weights = {k: v + 1 for k, v in model.state_dict().items()}
    plain = sharding.plain_model(weights)
    assert plain.out.weight is plain.embed.weight and not plain.embed.weight.is_meta
    assert torch.equal(plain.embed.weight, weights["embed.weight"]) and plain.scale.item() == 2.0
    model.load_state_dict(weights)
    x = torch.tensor([1, 2, 3])
    torch.testing.assert_close(plain(x), model(x))
    with pytest.raises(RuntimeError, match="do not fit the model"):
        sharding.plain_model({**weights, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="do not fit the model"):
        sharding.plain_model({"scale": torch.ones(())})
