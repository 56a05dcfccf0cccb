"""A resume continues only the run that wrote the checkpoint: another model, data or setting is
refused with the differences named."""
from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from conftest import save_tiny, tiny_config
from test_fit import make
from test_reliability import good_checkpoint, small_task  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def same_shape_other_weights(tmp_path_factory, tiny_tokenizer):
    """A BERT of the very shape of tiny_model_dir, with other weights."""
    torch.manual_seed(7)
    model = transformers.BertForSequenceClassification(tiny_config("bert", len(tiny_tokenizer), num_labels=1))
    return save_tiny(tmp_path_factory.mktemp("other-bert"), tiny_tokenizer, model)


@pytest.mark.parametrize("change, named", [
    (dict(objective="bce"), "objective"),
    (dict(seed=1), "seed"),
    (dict(lr=1e-3), "lr"),
    (dict(group_size=3), "group_size"),
    (dict(max_steps=6), "total_steps"),
    ("other backbone", "model"),
    ("other data", "data"),
])
def test_resume_refuses_another_run(tiny_model_dir, same_shape_other_weights, small_task, good_checkpoint, tmp_path,
                                    change, named):
    candidates, qrels = small_task
    shutil.copytree(good_checkpoint, tmp_path / "run")
    settings = dict(max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path / "run"), resume=True)
    model = tiny_model_dir
    if change == "other backbone":
        model = same_shape_other_weights
    elif change == "other data":
        qrels = qrels.assign(docno=qrels["docno"].str.replace("d2", "d3"))  # other positives
    else:
        settings.update(change)
    ce = make(model, **settings)
    before = {k: v.clone() for k, v in ce.model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"written by another run \(.*{named}: .* in the checkpoint") as info:
        ce.fit(candidates, qrels)
    assert "resume=False" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in ce.model.state_dict().items())  # nothing trained


def test_resume_of_the_same_run_goes_on(tiny_model_dir, small_task, good_checkpoint, tmp_path):
    candidates, qrels = small_task
    shutil.copytree(good_checkpoint, tmp_path / "run")
    ce = make(tiny_model_dir, max_steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path / "run"), resume=True)
    ce.fit(candidates, qrels)
    assert ce.history.frame("resume")["step"].tolist() == [2]
    # the same CrossEncoder object, interrupted and resumed in one notebook, still resumes
    ce.fit(candidates, qrels)
    assert ce.history.frame("resume")["step"].tolist() == [4]
