"""Scoring throughput: pyterrier-ce CrossEncoder vs sentence-transformers CrossEncoder.predict.

Same model (all-MiniLM-L6-v2), same (query, passage) pairs, same max_length and batch size, one
process, fp32 on the CPU. Each library scores the pairs ``--repeats`` times after a warm-up; the
best run counts. Prints a markdown table, the speed ratio and the largest score difference.

    python benchmarks/scoring.py --dataset vaswani --queries 20 --depth 50 --max-length 256
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import add_scoring_args, bm25_candidates, minilm_path, print_table


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    fn()  # warm-up: thread pools, allocator
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="vaswani")
    parser.add_argument("--split", default="test")
    add_scoring_args(parser)
    args = parser.parse_args()

    from sentence_transformers import CrossEncoder as STCrossEncoder

    from pyterrier_ce import CrossEncoder

    pairs = bm25_candidates(args.dataset, args.split, args.queries, args.depth)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    n = len(queries)
    path = minilm_path()
    ours = CrossEncoder(path, max_length=args.max_length, batch_size=args.batch_size, device="cpu", precision="fp32")
    theirs = STCrossEncoder(path, max_length=args.max_length, device="cpu", activation_fn=torch.nn.Identity())
    # the same weights, including the freshly initialised head
    theirs.model.load_state_dict(ours.model.state_dict())

    t_ours, s_ours = best_time(lambda: ours.score_pairs(queries, texts), args.repeats)
    t_st, s_st = best_time(
        lambda: theirs.predict(list(zip(queries, texts)), batch_size=args.batch_size, show_progress_bar=False),
        args.repeats,
    )
    print(f"{n} pairs ({args.dataset}, {args.queries} queries x BM25 top-{args.depth}), max_length {args.max_length}, "
          f"batch {args.batch_size}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print_table([
        {"library": "sentence-transformers CrossEncoder.predict", "seconds": t_st, "pairs/s": n / t_st},
        {"library": "pyterrier-ce CrossEncoder.score_pairs", "seconds": t_ours, "pairs/s": n / t_ours},
    ])
    print(f"\nspeed ratio (pyterrier-ce / sentence-transformers): {t_st / t_ours:.2f}x")
    print(f"max |score difference|: {np.abs(s_ours - s_st).max():.2e}")


if __name__ == "__main__":
    main()
