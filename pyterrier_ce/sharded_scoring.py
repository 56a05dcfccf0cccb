"""A pipeline teacher's scores computed once by several processes, before the students train.

Under ``accelerate launch`` or ``torch.distributed.run`` every process calls ``fit`` (or the
runner) with the same candidates. Rather than each process scoring all of them with, say, a 7B
teacher, each scores a share of whole queries (query ``q`` goes to process ``q mod N``) into a
score cache of its own (``<teacher cache>/shard-<rank>-of-<N>``: no two processes write one
SQLite file, and a rerun with the same processes finds its share cached), writes its scores to a
part file, and every process assembles all parts. N processes score N times faster; every
candidate is scored once.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import processes
from .atomic import write_file
from .candidates import Candidates
from .texts import TextSource


def candidates_digest(candidates: Candidates) -> str:
    """What rows the candidates hold (queries, docnos, order): names the part files of one scoring."""
    h = hashlib.blake2b(digest_size=8)
    for array in (candidates.qid_codes, candidates.docno_codes):
        h.update(np.ascontiguousarray(array).tobytes())
    for strings in (candidates.qids, candidates.queries, candidates.docnos.strings()):
        h.update("\x1f".join(map(str, strings)).encode())
    return h.hexdigest()


def share_of(candidates: Candidates, rank: int, world: int) -> List[np.ndarray]:
    """The row ranges (whole queries) of process ``rank`` of ``world``."""
    bounds = candidates.query_bounds()
    return [np.arange(bounds[q], bounds[q + 1]) for q in range(rank, len(candidates.qids), world)
            if bounds[q + 1] > bounds[q]]


def sharded_scores(teacher, candidates: Candidates, text_source: Optional[TextSource], text_field: str,
                   cache: Path, chunk_rows: int) -> np.ndarray:
    """``teacher``'s scores of ``candidates``, each process scoring its share (see the module)."""
    rank, world = processes.rank(), processes.world_size()
    parts = cache.parent / f"{cache.name}.parts" / candidates_digest(candidates)
    parts.mkdir(parents=True, exist_ok=True)
    mine = share_of(candidates, rank, world)
    own = teacher.with_cache_path(cache / f"shard-{rank}-of-{world}")
    rows_done: List[np.ndarray] = []
    scores_done: List[np.ndarray] = []
    at = 0
    while at < len(mine):
        chunk = [mine[at]]
        size = len(mine[at])
        at += 1
        while at < len(mine) and size + len(mine[at]) <= chunk_rows:
            chunk.append(mine[at])
            size += len(mine[at])
            at += 1
        rows = np.concatenate(chunk)
        rows_done.append(rows)
        scores_done.append(own.scores_of_rows(candidates, rows, text_source, text_field))
    rows_all = np.concatenate(rows_done) if rows_done else np.empty(0, dtype=np.int64)
    scores_all = np.concatenate(scores_done) if scores_done else np.empty(0)
    write_file(parts / f"part-{rank}-of-{world}.npz", lambda tmp: np.savez(tmp, rows=rows_all, scores=scores_all))
    processes.wait_for_everyone()
    out = np.full(len(candidates), np.nan)
    for other in range(world):
        with np.load(parts / f"part-{other}-of-{world}.npz") as data:
            out[data["rows"]] = data["scores"]
    processes.wait_for_everyone()
    if processes.is_main():
        shutil.rmtree(parts, ignore_errors=True)  # written for this scoring only
    return out
