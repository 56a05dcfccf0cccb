"""Scoring throughput: pyterrier-ce CrossEncoder vs sentence-transformers CrossEncoder.predict.

Same model (all-MiniLM-L6-v2), same (query, passage) pairs, same max_length and batch size, one
process, fp32 on the CPU (``--device cuda --precision bf16`` on a GPU). After a warm-up each,
the libraries score the pairs in turn, ``--repeats`` times; each one's best run counts (on a GPU
after ``torch.cuda.synchronize()``). Prints a markdown table (pairs/s and achieved GFLOP/s: the
nominal FLOPs of a full forward over the unpadded pairs, per second; on a GPU TFLOP/s and the
share of the card's dense peak at that precision), the speed ratio and the largest score
difference, for each of ``--batch-sizes`` (default: ``--batch-size``).

    python benchmarks/scoring.py --dataset vaswani --queries 20 --depth 50 --max-length 256
    python benchmarks/scoring.py --device cuda --precision bf16 --queries 93 --depth 200 --batch-sizes 256,512,1024
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np
import torch
from common import add_scoring_args, bm25_candidates, encoder_gflop, minilm_path, print_table


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time of ``repeats`` calls of ``fn`` after a warm-up, and its output."""
    return best_times({"fn": fn}, repeats)["fn"]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_times(fns: dict, repeats: int) -> dict:
    """Like :func:`best_time` for several functions, run in turn (so that a slow spell of the
    machine falls on all of them): name -> (best seconds, output). GPU work is waited for."""
    for fn in fns.values():
        fn()  # warm-up: thread pools, allocator, kernels' autotuning
    times = {name: [] for name in fns}
    out = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            out[name] = fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), np.asarray(out[name])) for name in fns}


# Dense tensor-core peaks (bf16) and plain fp32 peaks in TFLOP/s, from NVIDIA's data sheets,
# by a part of the device name: SXM parts (H100 80GB HBM3, H200) first, PCIe ones by "PCIe".
PEAK_TFLOPS = (("H100 PCIe", {"bf16": 756.0, "fp32": 51.2}), ("H100", {"bf16": 989.4, "fp32": 66.9}),
               ("H200", {"bf16": 989.4, "fp32": 66.9}), ("A100", {"bf16": 312.0, "fp32": 19.5}))


def peak_tflops(device: str, precision: str) -> Optional[float]:
    """The card's dense peak at ``precision`` (``None``: a CPU or a card not listed)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[precision] for part, peaks in PEAK_TFLOPS if part in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="vaswani")
    parser.add_argument("--split", default="test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: autocast here, bf16 weights in sentence-transformers (its usual bf16 use)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 256,512,1024: one table row pair "
                        "each, the model loaded once (default: --batch-size)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's peak at --precision (default: known H100/H200/A100 figures)")
    add_scoring_args(parser)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]

    from sentence_transformers import CrossEncoder as STCrossEncoder

    from pyterrier_ce import CrossEncoder

    pairs = bm25_candidates(args.dataset, args.split, args.queries, args.depth)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    n = len(queries)
    path = minilm_path()
    ours = CrossEncoder(path, max_length=args.max_length, batch_size=args.batch_size, device=args.device,
                        precision=args.precision, verbose=False)  # no progress bar, as predict's
    theirs = STCrossEncoder(path, max_length=args.max_length, device=args.device, activation_fn=torch.nn.Identity())
    # the same weights, including the freshly initialised head
    theirs.model.load_state_dict(ours.model.state_dict())
    if args.precision == "bf16":
        theirs.model.to(torch.bfloat16)

    lengths = [len(x) for x in ours.tokenizer(queries, texts, truncation=True, max_length=args.max_length)["input_ids"]]
    gflop = encoder_gflop(ours.model.config, lengths)
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    peak = args.peak_tflops or peak_tflops(args.device, args.precision)
    print(f"{n} pairs ({args.dataset}, {args.queries} queries x BM25 top-{args.depth}, {np.mean(lengths):.0f} tokens "
          f"on average), max_length {args.max_length}, batch {','.join(map(str, batch_sizes))}, {args.precision}, "
          f"{args.device} ({device_name}), torch {torch.__version__}; {gflop:.0f} GFLOP nominal"
          + (f"; peak {peak:.0f} TFLOP/s" if peak else "") + "\n")
    rows, notes = [], []
    for batch_size in batch_sizes:
        ours.batch_size = batch_size
        timed = best_times({
            "ours": lambda: ours.score_pairs(queries, texts),
            "st": lambda bs=batch_size: theirs.predict(list(zip(queries, texts)), batch_size=bs,
                                                       show_progress_bar=False),
        }, args.repeats)
        (t_ours, s_ours), (t_st, s_st) = timed["ours"], timed["st"]
        for library, seconds in (("sentence-transformers CrossEncoder.predict", t_st),
                                 ("pyterrier-ce CrossEncoder.score_pairs", t_ours)):
            row = {"library": library, "batch": batch_size, "seconds": seconds, "pairs/s": n / seconds}
            if cuda:
                row["TFLOP/s"] = gflop / seconds / 1e3
                if peak:
                    row["% of peak"] = 100 * gflop / seconds / 1e3 / peak
            else:
                row["GFLOP/s"] = gflop / seconds
            rows.append(row)
        notes.append(f"batch {batch_size}: speed ratio (pyterrier-ce / sentence-transformers) {t_st / t_ours:.2f}x, "
                     f"max |score difference| {np.abs(s_ours - s_st).max():.2e}")
    print_table(rows)
    print()
    print("\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
