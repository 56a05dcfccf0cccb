"""Model cards: save_pretrained writes a README.md the hub reads (front matter) with how the model
was trained; a README the user wrote is left alone; the runner adds its evaluation rows."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from test_fit import make, synthetic
from test_runner import (
    config,  # noqa: F401  (fixture)
    data_dir,  # noqa: F401  (fixture)
)

from pyterrier_ce.card import MARKER


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_saved_reranker_has_a_card_of_its_training(tiny_model_dir, tmp_path):
    candidates, qrels = synthetic(12)
    ce = make(tiny_model_dir, max_steps=3, verbose=False)
    ce.card_data = {"datasets": ["irds:msmarco-passage/train/judged"], "first_stage": "BM25 top-20"}
    ce.fit(candidates, qrels, candidates.head(18), qrels, eval_every=2)
    ce.save_pretrained(tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "pyterrier-ce" and "reranker" in meta["tags"]
    assert meta["datasets"] == ["irds:msmarco-passage/train/judged"] and "base_model" not in meta  # a local path
    assert MARKER in card and "Objective: `infonce`; 3 steps" in card and "First stage: BM25 top-20." in card
    assert "### Validation" in card and "| 2 | nDCG@10 |" in card and "12 of 12 training queries used" in card
    assert '"max_length": 32' not in card and "| 32 | text |" in card  # the saved settings, as a table


def test_a_readme_the_user_wrote_is_left_alone(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    make(tiny_model_dir).save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# my notes\n"
    assert (folder / "model.safetensors").exists()


def test_the_runner_adds_each_systems_evaluation_to_its_card(config, tmp_path):
    from pyterrier_ce.runner import run_config

    run_config(config)
    card = (tmp_path / "work" / "models" / "tiny-infonce-s1" / "README.md").read_text()
    assert "## Evaluation" in card and "| toy-bm25 |" in card and "nDCG@10 p-value" in card
    assert front_matter(card)["datasets"] == ["toy"]
    results = pd.read_csv(tmp_path / "work" / "results.csv")
    value = results[(results["name"] == "tiny-infonce-s1") & (results["dataset"] == "toy")]["nDCG@10"].iloc[0]
    assert f"{value:.4f}" in card


def test_a_saved_reranker_is_a_pyterrier_artifact(tiny_model_dir, tmp_path, monkeypatch):
    import numpy as np
    import pyterrier as pt

    from pyterrier_ce import CrossEncoder

    candidates, qrels = synthetic(8)
    ce = make(tiny_model_dir, max_steps=2, verbose=False).fit(candidates, qrels)
    ce.save_pretrained(tmp_path / "ranker")
    assert ce.path == tmp_path / "ranker"
    loaded = pt.Artifact.load(str(tmp_path / "ranker"))
    assert isinstance(loaded, CrossEncoder) and loaded.max_length == ce.max_length
    np.testing.assert_allclose(loaded(candidates)["score"], ce(candidates)["score"], atol=1e-6)
    package = ce.build_package(str(tmp_path / "ranker.tar.lz4"), verbose=False)  # what to_hf uploads
    assert package.endswith("ranker.tar.lz4")
    monkeypatch.setattr(pt.io, "pyterrier_home", lambda: str(tmp_path / "home"))  # the download cache
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a web server on this machine
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fetched = pt.Artifact.from_url(f"http://127.0.0.1:{server.server_port}/{Path(package).name}")
    finally:
        server.shutdown()
    assert isinstance(fetched, CrossEncoder)
    np.testing.assert_allclose(fetched(candidates)["score"], ce(candidates)["score"], atol=1e-6)


def test_the_card_says_how_other_libraries_read_adapters_and_templates(tiny_model_dir, tmp_path):
    plain = make(tiny_model_dir, verbose=False)
    plain.save_pretrained(tmp_path / "plain")
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "`AutoModelForSequenceClassification` load it too (raw logits)." in card and "prompt" not in card

    candidates, qrels = synthetic(8)
    prompted = make(tiny_model_dir, template="query: {query} document: {text}", verbose=False)
    prompted.fit(candidates, qrels, lora={"r": 4}, max_steps=1)
    prompted.save_pretrained(tmp_path / "adapters")
    card = (tmp_path / "adapters" / "README.md").read_text()
    assert "LoRA adapters and the head" in card and "merge_lora()" in card and "load it too" not in card
    assert "the prompt `query: {query} document: {text}` filled in" in card
