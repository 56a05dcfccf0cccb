"""save_pretrained / from_pretrained: a plain Hugging Face folder that other libraries score alike."""
from __future__ import annotations

import json
import os

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


def test_save_writes_the_models_files_and_leaves_the_users_alone(tiny_model_dir, tiny_encoder_dir, tmp_path):
    target = tmp_path / "model"
    CrossEncoder(str(tiny_model_dir), max_length=64).save_pretrained(target)
    (target / "notes.txt").write_text("my notes")
    (target / "runs").mkdir()
    (target / "runs" / "dl19.res").write_text("1 Q0 d1 1 2.0 x\n")
    CrossEncoder(str(tiny_encoder_dir), max_length=32).save_pretrained(target)
    assert (target / "notes.txt").read_text() == "my notes"
    assert (target / "runs" / "dl19.res").exists()
    assert json.loads((target / "config.json").read_text())["pyterrier_ce"]["max_length"] == 32
    assert CrossEncoder.from_pretrained(target) == CrossEncoder(str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left


def test_save_refuses_a_file_at_the_path_and_leaves_it(tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    target.write_text("a file of the user's")
    with pytest.raises(FileExistsError, match="is a file"):
        CrossEncoder(str(tiny_model_dir), max_length=64).save_pretrained(target)
    assert target.read_text() == "a file of the user's"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_weight_shards_of_an_earlier_save_are_replaced(tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    ce = CrossEncoder(str(tiny_model_dir), max_length=64)
    ce.model.save_pretrained(target, max_shard_size="20KB")  # an earlier, sharded save
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) > 1 and (target / "model.safetensors.index.json").exists()
    (target / "model-notes.txt").write_text("keep")
    ce.save_pretrained(target)
    assert not list(target.glob("model-*.safetensors")) and not (target / "model.safetensors.index.json").exists()
    assert (target / "model.safetensors").exists() and (target / "model-notes.txt").exists()
    assert CrossEncoder(str(target)).weights_fingerprint() == ce.weights_fingerprint()


def test_staging_left_by_a_dead_process_is_cleaned_and_a_live_ones_is_not(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    target = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".model.tmp-{int(dead.stdout)}"  # a crash while saving: half a model
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".model.tmp-{os.getppid()}"  # another process saving right now
    alive.mkdir()
    CrossEncoder(str(tiny_model_dir), max_length=64).save_pretrained(target)
    assert not left.exists() and alive.exists()


def test_a_folder_swap_never_leaves_the_path_empty(tmp_path, monkeypatch):
    from pyterrier_ce import atomic

    old, new = tmp_path / "last", tmp_path / ".last.tmp"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "state").write_text(text)
    renames = []
    real = os.replace

    def crash_on_second_rename(a, b):
        renames.append((a, b))
        if len(renames) == 2:
            raise KeyboardInterrupt  # kill between the two renames of a non-atomic swap
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", crash_on_second_rename)
    atomic.replace_dir(new, old)  # Linux: one atomic exchange, no rename to interrupt
    assert (old / "state").read_text() == "new" and not new.exists()

    # where no exchange exists: the old folder is put back by recover_dir after the crash
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    new.mkdir()
    (new / "state").write_text("newer")
    renames.clear()
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_dir(new, old)
    assert not old.exists()
    monkeypatch.setattr(atomic.os, "replace", real)
    assert atomic.recover_dir(old) and (old / "state").read_text() == "new"


def test_saving_prints_no_shard_bar(tiny_model_dir, tmp_path, capfd):
    CrossEncoder(str(tiny_model_dir), max_length=64).save_pretrained(tmp_path / "model")
    assert "Writing model shards" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()  # the user's setting is restored
