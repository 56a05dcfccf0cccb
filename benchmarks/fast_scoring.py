"""Opt-in faster CPU scoring: bf16 autocast and int8 dynamic quantisation, speed and cost.

Speed: the same Vaswani BM25 pairs scored by sentence-transformers ``predict`` (fp32) and by
pyterrier-ce at ``precision="fp32"``, ``"bf16"`` and ``"int8"``, one process, in turn, best of
``--repeats`` after a warm-up. Cost: a trained model (``--model``, e.g. the demo's) reranks
TREC DL 2019 BM25 top-100 at each precision; nDCG@10 and the largest score change.

    python benchmarks/fast_scoring.py --model DEMO/model
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pyterrier as pt
import torch
from common import DATA, add_scoring_args, bm25_candidates, encoder_gflop, minilm_path, print_table
from pyterrier.measures import nDCG
from scoring import best_times

PRECISIONS = ("fp32", "bf16", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained CrossEncoder folder, for the effectiveness check")
    add_scoring_args(parser)
    args = parser.parse_args()

    from sentence_transformers import CrossEncoder as STCrossEncoder

    from pyterrier_ce import BeirDataset, CrossEncoder

    pairs = bm25_candidates("vaswani", "test", args.queries, args.depth)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    n = len(queries)
    path = minilm_path()
    theirs = STCrossEncoder(path, max_length=args.max_length, device="cpu", activation_fn=torch.nn.Identity())
    rows, reference = [], None
    base = CrossEncoder(path, max_length=args.max_length, batch_size=args.batch_size, device="cpu")
    theirs.model.load_state_dict(base.model.state_dict())  # the same weights, head included
    scorers = {"sentence-transformers predict, fp32": lambda: theirs.predict(
        list(zip(queries, texts)), batch_size=args.batch_size, show_progress_bar=False)}
    for precision in PRECISIONS:
        ours = CrossEncoder(base.model, tokenizer=base.tokenizer, max_length=args.max_length,
                            batch_size=args.batch_size, device="cpu", precision=precision)
        scorers[f"pyterrier-ce, {precision}"] = lambda ours=ours: ours.score_pairs(queries, texts)
    timed = best_times(scorers, args.repeats)  # in turn, so that a slow spell falls on all
    lengths = [len(x) for x in base.tokenizer(queries, texts, truncation=True, max_length=args.max_length)["input_ids"]]
    gflop = encoder_gflop(base.model.config, lengths)
    t_st, s_st = timed["sentence-transformers predict, fp32"]
    for name, (t, s) in timed.items():
        rows.append({"scorer": name, "pairs/s": n / t, "GFLOP/s": gflop / t, "vs ST": t_st / t,
                     "max |score diff|": float(np.abs(s - s_st).max())})
    print(f"Speed: {n} Vaswani pairs ({args.queries} queries x BM25 top-{args.depth}), max_length "
          f"{args.max_length}, batch {args.batch_size}, {torch.get_num_threads()} threads\n")
    print_table(rows)

    dl = BeirDataset(DATA / "trec_dl_2019")
    first = pt.Transformer.from_df(dl.get_candidates("test")) >> dl.text_loader("text")
    topics, qrels = dl.get_topics("test"), dl.get_qrels("test")
    candidates = first(topics)
    rows = []
    for precision in PRECISIONS:
        ce = CrossEncoder.from_pretrained(args.model, device="cpu", precision=precision)
        start = time.perf_counter()
        res = ce(candidates)
        seconds = time.perf_counter() - start
        scores = res.sort_values(["qid", "docno"])["score"].to_numpy()
        reference = scores if reference is None else reference
        table = pt.Experiment([pt.Transformer.from_df(res)], topics, qrels, [nDCG @ 10])
        rows.append({"precision": precision, "nDCG@10": float(table["nDCG@10"].iloc[0]),
                     "seconds": seconds, "pairs/s": len(candidates) / seconds,
                     "max |score diff| vs fp32": float(np.abs(scores - reference).max())})
    print(f"\nCost: {args.model} reranking TREC DL 2019 BM25 top-100 ({len(candidates)} pairs, "
          f"max_length {ce.max_length})\n")
    print_table(rows)


if __name__ == "__main__":
    main()
