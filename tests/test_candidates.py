"""Candidates held compactly and texts on demand: run files, scoreddocs, docstores; training from
them gives the same weights as training from the in-memory frame."""
from __future__ import annotations

import gzip
from collections import namedtuple

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from test_fit import make, synthetic

from pyterrier_ce import CrossEncoder
from pyterrier_ce.candidates import Candidates
from pyterrier_ce.sampling import GroupSampler
from pyterrier_ce.teachers import RunTeacher
from pyterrier_ce.texts import DocstoreTexts, as_text_source
from pyterrier_ce.training.batches import prefetched

Doc = namedtuple("Doc", ["doc_id", "text"])
ScoredDoc = namedtuple("ScoredDoc", ["query_id", "doc_id", "score"])


class Docstore:
    """An ir_datasets-like docstore over a dict, counting what it was asked for."""

    def __init__(self, texts):
        self.docs = {d: Doc(d, t) for d, t in texts.items()}
        self.asked = 0

    def get_many(self, doc_ids):
        self.asked += len(doc_ids)
        return {d: self.docs[d] for d in doc_ids if d in self.docs}


def write_run(frame: pd.DataFrame, path, score: str = "score") -> None:
    with gzip.open(path, "wt") as f:
        for row in frame.itertuples():
            f.write(f"{row.qid} Q0 {row.docno} {row.rank} {getattr(row, score)} run\n")


@pytest.fixture(scope="module")
def task():
    frame, qrels = synthetic(40, per_query=6, seed=3)
    # shuffled rows: the first-stage order must come from the ranks, not from the file's order
    return frame.sample(frac=1.0, random_state=1).reset_index(drop=True), qrels


@pytest.fixture()
def on_disk(task, tmp_path):
    frame, _ = task
    write_run(frame, tmp_path / "run.gz")
    topics = frame[["qid", "query"]].drop_duplicates()
    store = Docstore(dict(zip(frame["docno"], frame["text"])))
    return Candidates.from_run(tmp_path / "run.gz", topics), store


def test_a_run_file_holds_the_frames_candidates_in_the_same_order(task, on_disk):
    frame, _ = task
    from_file, _ = on_disk
    from_frame = Candidates.from_frame(frame)
    assert from_file.texts is None and from_frame.texts is not None
    assert from_file.qids.tolist() == from_frame.qids.tolist() == sorted(frame["qid"].unique())
    assert from_file.queries.tolist() == from_frame.queries.tolist()
    rows = np.arange(len(from_frame))
    assert from_file.docno_strings(rows) == from_frame.docno_strings(rows)
    # each query's rows in first-stage (rank) order
    expected = frame.sort_values(["qid", "rank"])["docno"].tolist()
    assert from_frame.docno_strings(rows) == expected
    assert from_file.nbytes / len(from_file) == 16  # two int32 codes and an int64 row number per row


def test_groups_from_a_run_and_a_docstore_equal_the_frames(task, on_disk):
    frame, qrels = task
    candidates, store = on_disk
    in_memory = GroupSampler(frame, qrels, group_size=4, seed=2)
    on_demand = GroupSampler(candidates, qrels, group_size=4, seed=2, text_source=as_text_source(store))
    first = in_memory.epoch(1)
    second = on_demand.with_texts(on_demand.epoch(1))
    assert [(g.qid, g.query, g.docnos, g.texts, g.targets) for g in first] == \
           [(g.qid, g.query, g.docnos, g.texts, g.targets) for g in second]
    assert str(in_memory.report) == str(on_demand.report)


def weights(ce: CrossEncoder) -> dict:
    return {k: v.clone() for k, v in ce.model.state_dict().items()}


def assert_same_weights(a: CrossEncoder, b: CrossEncoder) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert a.history.frame("step")["loss"].tolist() == b.history.frame("step")["loss"].tolist()


def test_training_on_demand_gives_the_in_memory_weights(tiny_model_dir, task, on_disk):
    frame, qrels = task
    candidates, store = on_disk
    valid = frame[frame["qid"].isin(["q1", "q2", "q3"])]
    in_memory = make(tiny_model_dir, epochs=2, verbose=False).fit(frame, qrels, valid, qrels)
    on_demand = make(tiny_model_dir, epochs=2, verbose=False).fit(
        candidates, qrels, valid.drop(columns=["text"]), qrels, text_source=store)
    assert_same_weights(in_memory, on_demand)
    assert in_memory.history.frame("valid")["value"].tolist() == on_demand.history.frame("valid")["value"].tolist()
    # only the trained groups' texts were fetched (4 per group, 40 groups, 2 epochs) and the validation's
    assert store.asked == 2 * 40 * 4 + len(valid)


def test_a_frame_without_text_takes_its_texts_from_a_transformer(tiny_model_dir, task):
    frame, qrels = task
    texts = dict(zip(frame["docno"], frame["text"]))
    loader = pt.apply.generic(lambda df: df.assign(text=df["docno"].map(texts)))
    in_memory = make(tiny_model_dir, max_steps=4, verbose=False).fit(frame, qrels)
    on_demand = make(tiny_model_dir, max_steps=4, verbose=False).fit(frame.drop(columns=["text"]), qrels,
                                                                     text_source=loader)
    assert_same_weights(in_memory, on_demand)


def test_a_streamed_teacher_run_distils_as_the_frame_teacher(tiny_model_dir, task, on_disk, tmp_path):
    frame, qrels = task
    candidates, store = on_disk
    teacher = frame.assign(score=np.random.default_rng(0).normal(size=len(frame)))
    write_run(teacher, tmp_path / "teacher.gz")
    settings = dict(objective="margin_mse", max_steps=4, verbose=False)
    in_memory = make(tiny_model_dir, **settings).fit(frame, None, teacher=teacher)
    streamed = make(tiny_model_dir, **settings).fit(candidates, None, text_source=store,
                                                    teacher=RunTeacher(tmp_path / "teacher.gz"))
    assert_same_weights(in_memory, streamed)
    ranks_only = RunTeacher(tmp_path / "teacher.gz", use_ranks=True).scores_of(candidates)
    expected = RunTeacher(teacher.drop(columns=["score"])).scores(candidates.frame(np.arange(len(candidates))))
    np.testing.assert_array_equal(ranks_only, expected)


def test_a_teacher_run_that_misses_candidates_is_refused(task, on_disk, tmp_path):
    frame, _ = task
    candidates, _ = on_disk
    write_run(frame[frame["qid"] != "q5"], tmp_path / "partial.gz")
    with pytest.raises(ValueError, match=r"no score for 6 of 240 training candidates .*q5/"):
        RunTeacher(tmp_path / "partial.gz").scores_of(candidates)


def test_scoreddocs_give_the_runs_candidates(task, on_disk):
    frame, _ = task
    from_file, _ = on_disk
    records = [ScoredDoc(r.qid, r.docno, r.score) for r in frame.itertuples()]
    from_scoreddocs = Candidates.from_scoreddocs(iter(records), frame[["qid", "query"]])
    rows = np.arange(len(from_file))
    assert from_scoreddocs.docno_strings(rows) == from_file.docno_strings(rows)  # scores order as ranks do


def test_inputs_that_cannot_give_texts_are_refused(tiny_model_dir, task, on_disk):
    frame, qrels = task
    candidates, store = on_disk
    with pytest.raises(ValueError, match="has no texts: give text_source="):
        make(tiny_model_dir).fit(candidates, qrels)
    with pytest.raises(Exception, match="no `text` column"):
        make(tiny_model_dir).fit(frame.drop(columns=["text"]), qrels)
    del store.docs["q7d3"]
    with pytest.raises(ValueError, match="has no document 'q7d3'"):
        DocstoreTexts(store).texts(["q7d2", "q7d3"])
    with pytest.raises(ValueError, match="have no topic"):
        Candidates.from_run(frame, frame[["qid", "query"]].iloc[:3])
    with pytest.raises(TypeError, match="text_source must be"):
        as_text_source(42)


def test_prefetching_keeps_the_order_and_raises_the_producers_error():
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise KeyError("lost document")

    got = []
    with pytest.raises(KeyError, match="lost document"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]
    stream = prefetched(iter(range(1000)), depth=2)
    assert next(stream) == 0
    stream.close()  # the producer stops instead of waiting forever on a full queue


def test_pipeline_and_ensemble_teachers_score_compact_candidates_as_frames(task, on_disk, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    from pyterrier_ce import teachers
    from pyterrier_ce.teachers import Ensemble, PipelineTeacher

    frame, _ = task
    candidates, store = on_disk
    monkeypatch.setattr(teachers, "TEACHER_CHUNK_ROWS", 50)  # several calls, whole queries each
    scorer = CrossEncoder(str(tiny_model_dir), max_length=32, verbose=False)
    pipeline = PipelineTeacher(scorer, cache_dir=tmp_path / "cache")
    as_frame = candidates.frame(np.arange(len(candidates)), DocstoreTexts(store).texts(
        candidates.docno_strings(np.arange(len(candidates)))))
    chunked = pipeline.scores_of(candidates, as_text_source(store))
    # scored in other batches than the whole frame: equal up to batch-composition rounding
    np.testing.assert_allclose(chunked, PipelineTeacher(scorer).scores(as_frame), atol=1e-4)
    np.testing.assert_array_equal(pipeline.scores(as_frame), chunked)  # the cache holds the chunked scores
    run = frame.assign(score=np.random.default_rng(1).normal(size=len(frame)))
    ensemble = Ensemble([RunTeacher(run), PipelineTeacher(scorer)], weights=[1, 3])
    np.testing.assert_allclose(ensemble.scores_of(candidates, as_text_source(store)), ensemble.scores(as_frame),
                               atol=1e-4)


def test_a_parquet_run_reads_as_the_trec_file(task, on_disk, tmp_path):
    frame, _ = task
    from_trec, _ = on_disk
    frame[["qid", "docno", "rank", "score"]].to_parquet(tmp_path / "run.parquet")
    from_parquet = Candidates.from_run(tmp_path / "run.parquet", frame[["qid", "query"]])
    rows = np.arange(len(from_trec))
    assert from_parquet.docno_strings(rows) == from_trec.docno_strings(rows)
    assert from_parquet.queries.tolist() == from_trec.queries.tolist()


def test_texts_of_several_fields_are_joined():
    from pyterrier_ce.texts import TransformerTexts

    docs = {"a": ("Title A", "text a"), "b": ("", "text b")}
    loader = pt.apply.generic(lambda df: df.assign(title=df["docno"].map(lambda d: docs[d][0]),
                                                   text=df["docno"].map(lambda d: docs[d][1])))
    assert TransformerTexts(loader, fields=["title", "text"]).texts(["b", "a"]) == ["text b", "Title A text a"]
    store = Docstore({})
    store.docs = {"a": {"title": "Title A", "text": "text a"}}
    assert DocstoreTexts(store, ["title", "text"]).texts(["a"]) == ["Title A text a"]


def test_a_parquet_teacher_run_scores_as_the_trec_one(task, on_disk, tmp_path):
    frame, _ = task
    candidates, _ = on_disk
    teacher = frame.assign(score=np.random.default_rng(2).normal(size=len(frame)))
    write_run(teacher, tmp_path / "teacher.gz")
    teacher[["qid", "docno", "score"]].to_parquet(tmp_path / "teacher.parquet")
    np.testing.assert_allclose(RunTeacher(tmp_path / "teacher.parquet").scores_of(candidates),
                               RunTeacher(tmp_path / "teacher.gz").scores_of(candidates))
    assert len(RunTeacher(tmp_path / "teacher.parquet").run) == len(frame)


def test_plain_lists_and_empty_runs_align(on_disk):
    candidates, _ = on_disk
    first = candidates.docno_strings(np.arange(1))
    aligned = candidates.align([candidates.qids[0]], first, np.array([2.5]))  # lists, not Series
    assert aligned[0] == 2.5 and np.isnan(aligned[1:]).all()
    assert np.isnan(candidates.align_chunks(iter([]))).all()
