"""LoRA adapters (peft): trained with the head, saved as an adapter folder that reloads here and
in transformers + peft with the same scores, merged into a plain model sentence-transformers loads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_fit import make, ndcg, synthetic

from pyterrier_ce import CrossEncoder
from pyterrier_ce.lora import lora_wrapper

peft = pytest.importorskip("peft")

QUERIES = ["the cat", "war", "music film", "dog"]
TEXTS = ["a cat sat on the mat", "the war of the world", "film and music", "a dog and a cat"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    candidates, qrels = synthetic(40)
    ce = make(tiny_model_dir, epochs=6, lr=5e-3, lora={"r": 8, "alpha": 16, "dropout": 0.0}, verbose=False)
    before = ndcg(ce, candidates, qrels)
    base = {k: v.clone() for k, v in ce.model.state_dict().items()}
    ce.fit(candidates, qrels)
    return ce, before, ndcg(ce, candidates, qrels), base


def test_lora_trains_the_adapters_and_the_head_only(trained):
    ce, before, after, base = trained
    assert lora_wrapper(ce.model) is not None and after > before + 0.2
    memory = ce.history.frame("start").iloc[0]["memory"]
    adapters = sum(p.numel() for n, p in ce.model.named_parameters() if "lora_" in n)
    head = sum(p.numel() for n, p in ce.model.named_parameters() if "modules_to_save" in n)
    assert memory["trainable"] == adapters + head < memory["parameters"] / 4  # r=8 on a 32-wide model
    after = {n.replace(".base_layer", ""): v for n, v in ce.model.state_dict().items()
             if "lora_" not in n and "classifier" not in n}
    assert len(after) == len([n for n in base if "classifier" not in n])  # the backbone, unchanged
    assert all(torch.equal(base[n], value) for n, value in after.items())


def test_an_adapter_folder_reloads_here_and_in_transformers_with_the_same_scores(trained, tmp_path):
    ce, *_ = trained
    expected = ce.score_pairs(QUERIES, TEXTS)
    ce.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "pyterrier_ce.json"} <= files
    assert "model.safetensors" not in files
    again = CrossEncoder(str(tmp_path / "adapter"), verbose=False)
    assert again.max_length == ce.max_length and lora_wrapper(again.model) is not None
    np.testing.assert_allclose(again.score_pairs(QUERIES, TEXTS), expected, atol=1e-5)
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter")).eval()
    inputs = ce.tokenizer(QUERIES, TEXTS, padding=True, truncation=True, max_length=ce.max_length,
                          return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[:, 0].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)  # other padding: rounding apart


def test_merged_adapters_make_a_plain_model_sentence_transformers_loads(trained, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ce, *_ = trained
    expected = ce.score_pairs(QUERIES, TEXTS)
    copy = CrossEncoder.__new__(CrossEncoder)
    copy.__dict__.update(ce.__dict__)
    import copy as copying

    copy.model = copying.deepcopy(ce.model)
    copy.merge_lora()
    assert lora_wrapper(copy.model) is None and not any("lora_" in n for n, _ in copy.model.named_parameters())
    copy.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    st = STCrossEncoder(str(tmp_path / "merged"), max_length=ce.max_length)
    np.testing.assert_allclose(st.predict(list(zip(QUERIES, TEXTS))), expected, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        copy.merge_lora()


def test_unknown_lora_settings_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="Unknown lora setting"):
        make(tiny_model_dir, lora={"rank": 8})


def test_the_best_validated_adapters_come_back_from_the_checkpoint_folder(tiny_model_dir, tmp_path, monkeypatch):
    """best/ is an adapter folder: at the end of fit its adapters and head are loaded back."""
    from pyterrier_ce.training.validation import Validator

    values = iter([0.9, 0.5])  # the validation after step 3 is the best; after step 6 it is worse
    monkeypatch.setattr(Validator, "evaluate", lambda self, model: next(values))
    candidates, qrels = synthetic(16)
    ce = make(tiny_model_dir, max_steps=6, eval_every=3, lr=5e-3, lora={"r": 8, "alpha": 16, "dropout": 0.0},
              checkpoint_dir=str(tmp_path / "run"), verbose=False)
    ce.fit(candidates, qrels, valid=candidates, valid_qrels=qrels)
    assert ce.history.frame("end")["best_step"].tolist() == [3]
    best = CrossEncoder(str(tmp_path / "run" / "best"), verbose=False)
    np.testing.assert_allclose(ce.score_pairs(QUERIES, TEXTS), best.score_pairs(QUERIES, TEXTS), atol=1e-6)
    last = load_file(tmp_path / "run" / "last" / "model.safetensors")  # step 6: other adapters
    ours = ce.model.state_dict()
    assert any(not torch.equal(ours[k], last[k]) for k in last if "lora_" in k)
