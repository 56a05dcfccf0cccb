"""save_pretrained / from_pretrained: a plain Hugging Face folder that other libraries score alike."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from pyterrier_ce import CrossEncoder


def test_round_trip_keeps_scores_and_settings(tiny_encoder_dir, tmp_path, pairs_frame):
    ce = CrossEncoder(str(tiny_encoder_dir), max_length=48, text_field="body")
    frame = pairs_frame.rename(columns={"text": "body"})
    before = ce(frame)
    ce.save_pretrained(tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith(".bin") for name in files)
    again = CrossEncoder.from_pretrained(tmp_path / "model")
    assert (again.max_length, again.text_field) == (48, "body")
    np.testing.assert_allclose(again(frame)["score"].to_numpy(), before["score"].to_numpy(), atol=1e-6)
    assert CrossEncoder.from_pretrained(tmp_path / "model", max_length=32).max_length == 32
    # the constructor too scores a saved model at its saved budget unless told otherwise
    assert CrossEncoder(str(tmp_path / "model")).max_length == 48
    assert CrossEncoder(str(tmp_path / "model"), max_length=40).max_length == 40


def test_transformers_loads_the_same_logits(tiny_encoder_dir, tmp_path, pairs_frame):
    ce = CrossEncoder(str(tiny_encoder_dir), max_length=64)
    ce.save_pretrained(tmp_path / "model")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    enc = tok(pairs_frame["query"].tolist(), pairs_frame["text"].tolist(), padding=True, truncation=True,
              max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, 0].numpy()
    ours = ce.score_pairs(pairs_frame["query"].tolist(), pairs_frame["text"].tolist())
    np.testing.assert_allclose(ours, logits, atol=1e-5)


def test_sentence_transformers_loads_the_same_logits(tiny_encoder_dir, tmp_path, pairs_frame):
    st = pytest.importorskip("sentence_transformers")
    ce = CrossEncoder(str(tiny_encoder_dir), max_length=64)
    ce.save_pretrained(tmp_path / "model")
    theirs = st.CrossEncoder(str(tmp_path / "model"), device="cpu").predict(
        list(zip(pairs_frame["query"], pairs_frame["text"])))
    ours = ce.score_pairs(pairs_frame["query"].tolist(), pairs_frame["text"].tolist())
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # raw logits, no sigmoid


def test_save_replaces_an_existing_folder_whole(tiny_model_dir, tiny_encoder_dir, tmp_path):
    target = tmp_path / "model"
    CrossEncoder(str(tiny_model_dir), max_length=64).save_pretrained(target)
    (target / "stale.txt").write_text("from an older save")
    CrossEncoder(str(tiny_encoder_dir), max_length=32).save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert json.loads((target / "config.json").read_text())["pyterrier_ce"]["max_length"] == 32
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left
