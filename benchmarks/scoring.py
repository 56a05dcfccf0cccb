"""Scoring throughput: pyterrier-ce CrossEncoder vs sentence-transformers CrossEncoder.predict.

Same model (all-MiniLM-L6-v2), same (query, passage) pairs, same max_length and batch size, one
process, fp32 on the CPU (``--device cuda --precision bf16`` on a GPU). After a warm-up each,
the libraries score the pairs in turn, ``--repeats`` times; each one's best run counts. Prints a
markdown table (pairs/s and achieved
GFLOP/s: the nominal FLOPs of a full forward over the unpadded pairs, per second), the speed ratio
and the largest score difference.

    python benchmarks/scoring.py --dataset vaswani --queries 20 --depth 50 --max-length 256
    python benchmarks/scoring.py --device cuda --precision bf16 --queries 93 --depth 100 --batch-size 256
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import add_scoring_args, bm25_candidates, encoder_gflop, minilm_path, print_table


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time of ``repeats`` calls of ``fn`` after a warm-up, and its output."""
    return best_times({"fn": fn}, repeats)["fn"]


def best_times(fns: dict, repeats: int) -> dict:
    """Like :func:`best_time` for several functions, run in turn (so that a slow spell of the
    machine falls on all of them): name -> (best seconds, output)."""
    for fn in fns.values():
        fn()  # warm-up: thread pools, allocator
    times = {name: [] for name in fns}
    out = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), np.asarray(out[name])) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="vaswani")
    parser.add_argument("--split", default="test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: autocast here, bf16 weights in sentence-transformers (its usual bf16 use)")
    add_scoring_args(parser)
    args = parser.parse_args()

    from sentence_transformers import CrossEncoder as STCrossEncoder

    from pyterrier_ce import CrossEncoder

    pairs = bm25_candidates(args.dataset, args.split, args.queries, args.depth)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    n = len(queries)
    path = minilm_path()
    ours = CrossEncoder(path, max_length=args.max_length, batch_size=args.batch_size, device=args.device,
                        precision=args.precision)
    theirs = STCrossEncoder(path, max_length=args.max_length, device=args.device, activation_fn=torch.nn.Identity())
    # the same weights, including the freshly initialised head
    theirs.model.load_state_dict(ours.model.state_dict())
    if args.precision == "bf16":
        theirs.model.to(torch.bfloat16)

    timed = best_times({
        "ours": lambda: ours.score_pairs(queries, texts),
        "st": lambda: theirs.predict(list(zip(queries, texts)), batch_size=args.batch_size, show_progress_bar=False),
    }, args.repeats)
    (t_ours, s_ours), (t_st, s_st) = timed["ours"], timed["st"]
    lengths = [len(x) for x in ours.tokenizer(queries, texts, truncation=True, max_length=args.max_length)["input_ids"]]
    gflop = encoder_gflop(ours.model.config, lengths)
    print(f"{n} pairs ({args.dataset}, {args.queries} queries x BM25 top-{args.depth}, {np.mean(lengths):.0f} tokens "
          f"on average), max_length {args.max_length}, batch {args.batch_size}, {args.precision}, {args.device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}; {gflop:.0f} GFLOP nominal\n")
    print_table([
        {"library": "sentence-transformers CrossEncoder.predict", "seconds": t_st, "pairs/s": n / t_st,
         "GFLOP/s": gflop / t_st},
        {"library": "pyterrier-ce CrossEncoder.score_pairs", "seconds": t_ours, "pairs/s": n / t_ours,
         "GFLOP/s": gflop / t_ours},
    ])
    print(f"\nspeed ratio (pyterrier-ce / sentence-transformers): {t_st / t_ours:.2f}x")
    print(f"max |score difference|: {np.abs(s_ours - s_st).max():.2e}")


if __name__ == "__main__":
    main()
