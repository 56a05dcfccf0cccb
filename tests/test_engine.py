"""The engine under memory pressure, compiled, and with tokenisation overlapped with scoring.

Out-of-memory errors are simulated: the tiny BERT's forward raises ``torch.OutOfMemoryError``
(or a plain ``RuntimeError`` saying "out of memory", as older CUDA paths do) for batches of more
than a given number of rows, or its backward does.
"""
from __future__ import annotations

import shutil
import threading
import types
import warnings

import numpy as np
import pytest
import torch
import transformers
from conftest import WORDS, save_tiny, tiny_config

from pyterrier_ce import CrossEncoder, memory, scoring
from pyterrier_ce.training import steps
from pyterrier_ce.training.steps import StepRunner

BERT = transformers.BertForSequenceClassification


def pairs(n: int = 23, seed: int = 0):
    """``n`` (query, text) pairs of varied lengths."""
    rng = np.random.default_rng(seed)
    queries = [" ".join(rng.choice(WORDS, rng.integers(1, 5))) for _ in range(n)]
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, 40))) for _ in range(n)]
    return queries, texts


def limit_rows(monkeypatch, max_rows: int, error=torch.OutOfMemoryError, backward: bool = False) -> list:
    """Makes the tiny BERT run out of memory on batches of more than ``max_rows`` rows, in its
    forward pass (or, with ``backward``, in its backward pass); returns the row counts it saw."""
    real = BERT.forward
    seen = []

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits):
            ctx.rows = logits.shape[0]
            return logits.view_as(logits)

        @staticmethod
        def backward(ctx, grad):
            if ctx.rows > max_rows:
                raise error(f"CUDA out of memory (simulated backward of {ctx.rows} rows)")
            return grad

    def forward(self, input_ids=None, **kwargs):
        rows = input_ids.shape[0]
        seen.append(rows)
        if not backward and rows > max_rows:
            raise error(f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated, {rows} rows)")
        out = real(self, input_ids=input_ids, **kwargs)
        if backward and torch.is_grad_enabled():
            out.logits = FailingBackward.apply(out.logits)
        return out

    monkeypatch.setattr(BERT, "forward", forward)
    return seen


# -- scoring: out of memory ---------------------------------------------------------------------


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_scoring_splits_batches_that_run_out_of_memory(tiny_model_dir, monkeypatch, error):
    queries, texts = pairs()
    ce = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64, device="cpu")
    expected = ce.score_pairs(queries, texts)
    in_pairs = CrossEncoder(str(tiny_model_dir), batch_size=2, max_length=64, device="cpu").score_pairs(queries, texts)
    seen = limit_rows(monkeypatch, 3, error)
    with pytest.warns(UserWarning, match=r"batch size was lowered from 8 to 2 for this call\. Pass CrossEncoder\(batch_size=2\)"):
        got = ce.score_pairs(queries, texts)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # exactly the batches, hence the scores, of batch_size=2, as the warning suggests
    np.testing.assert_array_equal(got, in_pairs)
    # 8 and 4 fail once; the lowered size is kept for the rest of the call
    assert [rows for rows in seen if rows > 3] == [8, 4]
    assert sum(rows for rows in seen if rows <= 3) == len(queries)
    # the next call starts from batch_size again (the warning says how to keep it lower)
    seen.clear()
    with pytest.warns(UserWarning, match="from 8 to 2"):
        ce.score_pairs(queries, texts)
    assert seen[0] == 8


def test_scoring_without_memory_trouble_does_not_warn(tiny_model_dir):
    queries, texts = pairs()
    ce = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce.score_pairs(queries, texts)


def test_scoring_a_single_pair_out_of_memory_says_what_to_do(tiny_model_dir, monkeypatch):
    queries, texts = pairs(5)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=4, max_length=64, device="cpu")
    seen = limit_rows(monkeypatch, 0)
    with pytest.raises(torch.OutOfMemoryError, match=r"single pair.*lower max_length \(now 64\).*smaller precision"):
        ce.score_pairs(queries, texts)
    assert seen == [4, 2, 1]
    assert not ce.model.training


def test_scoring_errors_other_than_memory_are_not_retried(tiny_model_dir, monkeypatch):
    queries, texts = pairs(5)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=4, max_length=64, device="cpu")
    seen = limit_rows(monkeypatch, 0, error=lambda message: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ce.score_pairs(queries, texts)
    assert seen == [4]


def test_is_out_of_memory():
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert memory.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert memory.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not memory.is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not memory.is_out_of_memory(ValueError("out of memory"))


# -- scoring: tokenisation overlapped with compute ----------------------------------------------


def test_chunks_are_tokenised_in_the_background_and_scores_keep_their_order(tiny_model_dir, monkeypatch):
    queries, texts = pairs(23)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=4, max_length=64, device="cpu")
    expected = ce.score_pairs(queries, texts)  # one chunk
    real_tokenize = scoring.tokenize_pairs
    threads = []

    def spy(tokenizer, q, t, max_length, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real_tokenize(tokenizer, q, t, max_length, **kwargs)

    monkeypatch.setattr(scoring, "tokenize_pairs", spy)
    monkeypatch.setattr(scoring, "CHUNK_SIZE", 5)
    got = ce.score_pairs(queries, texts)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert threads == [False] * 5  # ceil(23 / 5) chunks, each tokenised off the main thread
    one = [ce.score_pairs([q], [t])[0] for q, t in zip(queries, texts)]
    np.testing.assert_allclose(got, one, rtol=0, atol=1e-5)


def test_the_next_chunk_is_tokenised_while_the_current_one_is_scored(tiny_model_dir, monkeypatch):
    queries, texts = pairs(10)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64, device="cpu")
    monkeypatch.setattr(scoring, "CHUNK_SIZE", 5)
    real_tokenize, real_forward = scoring.tokenize_pairs, BERT.forward
    second_chunk_started = threading.Event()
    waited = []

    def tokenize(tokenizer, q, t, max_length, **kwargs):
        if q[0] == queries[5]:
            second_chunk_started.set()
        return real_tokenize(tokenizer, q, t, max_length, **kwargs)

    def forward(self, **kwargs):
        if not waited:  # the first batch: the second chunk must be under way meanwhile
            waited.append(second_chunk_started.wait(timeout=60))
        return real_forward(self, **kwargs)

    monkeypatch.setattr(scoring, "tokenize_pairs", tokenize)
    monkeypatch.setattr(BERT, "forward", forward)
    ce.score_pairs(queries, texts)
    assert waited == [True]


def test_a_tokenisation_error_in_the_background_propagates(tiny_model_dir, monkeypatch):
    queries, texts = pairs(23)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=4, max_length=64, device="cpu")
    real_tokenize = scoring.tokenize_pairs

    def failing(tokenizer, q, t, max_length, **kwargs):
        if q[0] == queries[10]:
            raise ValueError("cannot tokenise chunk 3")
        return real_tokenize(tokenizer, q, t, max_length, **kwargs)

    monkeypatch.setattr(scoring, "tokenize_pairs", failing)
    monkeypatch.setattr(scoring, "CHUNK_SIZE", 5)
    with pytest.raises(ValueError, match="cannot tokenise chunk 3"):
        ce.score_pairs(queries, texts)
    assert not any(t.name.startswith("pyterrier-ce-tokenize") for t in threading.enumerate())
    assert not ce.model.training


def test_a_scoring_error_stops_the_background_tokeniser(tiny_model_dir, monkeypatch):
    queries, texts = pairs(23)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=4, max_length=64, device="cpu")
    monkeypatch.setattr(scoring, "CHUNK_SIZE", 5)
    limit_rows(monkeypatch, 0, error=lambda message: KeyError("broken model"))
    with pytest.raises(KeyError, match="broken model"):
        ce.score_pairs(queries, texts)
    assert not any(t.name.startswith("pyterrier-ce-tokenize") for t in threading.enumerate())


# -- training: out of memory --------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_dropout_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    config = tiny_config("bert", len(tiny_tokenizer), num_labels=1, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    return save_tiny(tmp_path_factory.mktemp("no-dropout"), tiny_tokenizer, BERT(config))


@pytest.fixture(scope="module")
def task():
    from test_fit import synthetic

    return synthetic(40)


def train(folder, task, **settings):
    """Three fp32 steps of 2 micro-batches of 4 groups of 4 pairs (16 pairs a micro-batch)."""
    candidates, qrels = task
    base = dict(max_length=32, group_size=4, train_batch_size=4, grad_accum_steps=2, max_steps=3, lr=1e-3,
                head_lr=None, precision="fp32", seed=0)
    ce = CrossEncoder(str(folder), **{**base, **settings})
    ce.fit(candidates, qrels)
    return ce


def assert_same_training(a: CrossEncoder, b: CrossEncoder, atol: float = 1e-6, skip: tuple = ()) -> None:
    np.testing.assert_allclose(a.history.frame("step")["loss"], b.history.frame("step")["loss"], rtol=0, atol=atol)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        if name not in skip:
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


def test_training_halves_forward_passes_that_run_out_of_memory(no_dropout_dir, task, monkeypatch):
    monkeypatch.setattr(steps, "FORWARD_CHUNK", 4)
    expected = train(no_dropout_dir, task)  # unconstrained, in passes of 4 pairs
    monkeypatch.setattr(steps, "FORWARD_CHUNK", 32)
    unchunked = train(no_dropout_dir, task)  # unconstrained, in passes of 16 pairs
    seen = limit_rows(monkeypatch, 5)
    with pytest.warns(UserWarning, match="ran out of memory at step 1; it goes on with forward passes of at most 4 pairs"):
        ce = train(no_dropout_dir, task)
    assert_same_training(ce, expected)
    # Against passes of 16 pairs the losses agree too; the weights only up to float noise, which
    # Adam amplifies on gradients that are zero but for rounding (the head's bias under InfoNCE).
    np.testing.assert_allclose(ce.history.frame("step")["loss"], unchunked.history.frame("step")["loss"],
                               rtol=0, atol=1e-5)
    assert [rows for rows in seen if rows > 5] == [16, 8]  # the smaller passes are kept
    events = ce.history.frame("out_of_memory")
    assert events[["step", "phase", "forward_chunk", "recompute"]].values.tolist() == [
        [1, "forward", 8, False], [1, "forward", 4, False]]


@pytest.mark.parametrize("objective, dropout", [("bce", 0.0), ("ranknet", 0.1)])
def test_training_recomputes_when_the_backward_pass_runs_out_of_memory(no_dropout_dir, task, monkeypatch,
                                                                        objective, dropout):
    monkeypatch.setattr(steps, "FORWARD_CHUNK", 4)
    expected = train(no_dropout_dir, task, objective=objective, dropout=dropout)  # unconstrained, passes of 4
    monkeypatch.setattr(steps, "FORWARD_CHUNK", 32)
    limit_rows(monkeypatch, 5, backward=True)
    with pytest.warns(UserWarning, match="at most 4 pairs, holding one forward pass's activations at a time"):
        ce = train(no_dropout_dir, task, objective=objective, dropout=dropout)
    # The same gradients (and, replaying each pass's RNG state, the same dropout masks). Summed in
    # another order, they differ by float rounding, which Adam amplifies where the true gradient is
    # zero: the head's bias under pairwise and listwise objectives, which ignore a common shift.
    skip = () if objective == "bce" else ("classifier.bias",)
    assert_same_training(ce, expected, skip=skip)
    events = ce.history.frame("out_of_memory")
    assert events[["phase", "forward_chunk", "recompute"]].values.tolist() == [
        ["backward", 32, True], ["backward", 8, True], ["backward", 4, True]]


def test_training_a_single_pair_out_of_memory_says_what_to_do(no_dropout_dir, task, monkeypatch):
    limit_rows(monkeypatch, 0)
    with pytest.raises(torch.OutOfMemoryError, match=r"one pair per forward pass: lower train_max_length \(now 32\)"):
        train(no_dropout_dir, task)


def test_training_errors_other_than_memory_are_not_retried(no_dropout_dir, task, monkeypatch):
    seen = limit_rows(monkeypatch, 0, error=lambda message: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train(no_dropout_dir, task)
    assert seen == [16]


def test_distributed_training_does_not_split_after_out_of_memory():
    trainer = types.SimpleNamespace(
        world=2, step=4, _phase="backward", _largest_pass=16, forward_chunk=32, recompute=False,
        device=torch.device("cuda", 1), plan=types.SimpleNamespace(max_length=256),
    )
    with pytest.raises(torch.OutOfMemoryError, match=r"step 5 on cuda:1 \(one of 2 processes\): lower "
                                                     r"train_batch_size and raise grad_accum_steps"):
        StepRunner._after_out_of_memory(trainer, torch.OutOfMemoryError("CUDA out of memory"))
    assert (trainer.forward_chunk, trainer.recompute) == (32, False)


# -- torch.compile ------------------------------------------------------------------------------


def test_compile_is_not_part_of_the_identity(tiny_model_dir):
    plain = CrossEncoder(str(tiny_model_dir), max_length=64)
    compiled = CrossEncoder(str(tiny_model_dir), max_length=64, compile_model=True)
    assert plain == compiled and hash(plain) == hash(compiled)
    assert compiled.weights_fingerprint() == plain.weights_fingerprint()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compile_failure_falls_back_to_eager_with_one_warning(tiny_model_dir, monkeypatch, precision):
    queries, texts = pairs()
    eager = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64, precision=precision)
    expected = eager.score_pairs(queries, texts)
    attempts = []

    def no_compiler(model, **kwargs):
        assert kwargs == {"dynamic": True}

        def compiled(**inputs):
            attempts.append(model)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64, precision=precision, compile_model=True)
    with pytest.warns(UserWarning, match="could not compile the model.*InvalidCxxCompiler") as record:
        got = ce.score_pairs(queries, texts)
    assert sum("could not compile" in str(w.message) for w in record) == 1
    np.testing.assert_array_equal(got, expected)
    assert attempts == [ce._scoring_model()]  # the int8 copy is what gets compiled for int8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ce.score_pairs(queries, texts), expected)
    assert len(attempts) == 1


def test_compiled_model_errors_are_the_models(tiny_model_dir, monkeypatch):
    """An error that eager mode raises too is not blamed on the compiler."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    limit_rows(monkeypatch, 0, error=lambda message: KeyError("broken model"))
    ce = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64, compile_model=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError, match="broken model"):
            ce.score_pairs(*pairs(3))
    assert not ce._compiled_model.eager


def test_out_of_memory_in_a_compiled_model_splits_batches(tiny_model_dir, monkeypatch):
    queries, texts = pairs()
    expected = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64).score_pairs(queries, texts)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    limit_rows(monkeypatch, 3)
    ce = CrossEncoder(str(tiny_model_dir), batch_size=8, max_length=64, compile_model=True)
    with pytest.warns(UserWarning, match="from 8 to 2"):
        got = ce.score_pairs(queries, texts)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert not ce._compiled_model.eager


@pytest.mark.slow  # compiling the tiny BERT takes ~45 s on 2 CPU cores
def test_compiled_scores_match_eager(tiny_model_dir, pairs_frame, tmp_path):
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang", "clang++")):
        pytest.skip("torch.compile needs a C++ compiler on the CPU; none is installed")
    eager = CrossEncoder(str(tiny_model_dir), batch_size=3, max_length=64)
    compiled = CrossEncoder(str(tiny_model_dir), batch_size=3, max_length=64, compile_model=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = compiled(pairs_frame)
    if compiled._compiled_model.eager:
        pytest.skip(f"torch.compile cannot run here: {[str(w.message) for w in record if 'compile' in str(w.message)]}")
    expected = eager(pairs_frame)
    np.testing.assert_allclose(out["score"], expected["score"], rtol=0, atol=1e-4)
    assert out["docno"].tolist() == expected["docno"].tolist()
    # other batch shapes reuse the dynamic-shape graph; the plain model saves as before
    queries, texts = pairs()
    np.testing.assert_allclose(compiled.score_pairs(queries, texts), eager.score_pairs(queries, texts), rtol=0, atol=1e-4)
    assert not compiled._compiled_model.eager
    assert type(compiled.model) is BERT
    compiled.save_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(CrossEncoder.from_pretrained(tmp_path / "saved")(pairs_frame)["score"],
                               expected["score"], rtol=0, atol=1e-6)


def test_padded_chunks_cover_every_pair_within_limits_and_pad_less():
    from pyterrier_ce.batching import padded_chunks

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(60, 160, 56), rng.integers(300, 512, 8)])  # a long tail
    chunks = padded_chunks(lengths, max_pairs=32, max_tokens=8192)
    rows = np.concatenate(chunks)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every pair once
    for chunk in chunks:
        assert len(chunk) <= 32
        assert len(chunk) == 1 or len(chunk) * lengths[chunk].max() <= 8192
    padded = sum(len(c) * lengths[c].max() for c in chunks)
    order = np.argsort(-lengths)  # fixed passes of 32 pairs, longest first
    fixed = sum(len(c) * lengths[c].max() for c in (order[i:i + 32] for i in range(0, len(order), 32)))
    assert padded < 0.85 * fixed
    # a pair longer than the token budget runs alone instead of failing
    assert [len(c) for c in padded_chunks(np.array([9000, 10, 10]), 32, 8192)] == [1, 2]
