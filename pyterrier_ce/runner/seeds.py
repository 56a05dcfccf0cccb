"""Tables over seeds: each (model, objective) as the mean ± sd of its seeds, tested query by query.

A config with several ``seeds`` trains each (model, objective) once per seed. The seed sets the
order and draw of the training groups, the head's initialisation and dropout; the training and
evaluation queries are drawn with their own (fixed) ``seed`` of the data sections, so seeds differ
only in training. This table gives, per measure, the mean and standard deviation over the seeds
of each system's value (the values of the per-seed ``pt.Experiment`` table), and a paired t-test
(scipy's ``ttest_rel``, as ``pt.Experiment``) between the per-query values *averaged over the
seeds* and those of the baseline, with the config's multiple-testing correction (statsmodels'
``multipletests``, as ``pt.Experiment``): the seed noise averages out of each query before the
queries are compared.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from .specs import Config

SD = " sd"


def seed_groups(cfg: Config) -> Dict[str, List[str]]:
    """Group name -> the system names it averages: ``model-objective`` for trained systems (one
    per seed); the first stage and other systems are groups of their own."""
    groups: Dict[str, List[str]] = {}
    for name in cfg.system_names():
        system = next((s for s in cfg.systems if s.name == name), None)
        key = name if system is None else f"{system.model.name}-{system.objective.label}"
        groups.setdefault(key, []).append(name)
    return groups


def baseline_group(cfg: Config) -> Optional[str]:
    """The group of the config's baseline system (e.g. ``L3-infonce`` for ``L3-infonce-s42``)."""
    return _group_of(seed_groups(cfg), cfg.baseline)


def has_seeds(cfg: Config) -> bool:
    """Whether some (model, objective) is trained at several seeds."""
    return any(len(names) > 1 for names in seed_groups(cfg).values())


def over_seeds(cfg: Config, table: pd.DataFrame, per_query: pd.DataFrame, measures: List[str]) -> pd.DataFrame:
    """The over-seeds table of one evaluation set.

    Args:
        table: The per-seed ``pt.Experiment`` table (``name`` and one column per measure).
        per_query: ``pt.Experiment(..., perquery=True)`` over the same systems (name, qid,
            measure, value).
        measures: The measure columns.
    """
    groups = seed_groups(cfg)
    values = table.set_index("name")
    baseline = baseline_group(cfg)
    averaged = {group: _per_query_mean(per_query, names) for group, names in groups.items()}
    rows = []
    for group, names in groups.items():
        row: Dict[str, object] = {"name": group, "seeds": len(names)}
        for measure in measures:
            seed_values = values.loc[names, measure].astype(float)
            row[measure] = float(seed_values.mean())
            row[measure + SD] = float(seed_values.std(ddof=1)) if len(names) > 1 else np.nan
            if baseline is not None and group != baseline:
                ours, theirs = _paired(averaged[group], averaged[baseline], measure)
                row[measure + " +"] = int((ours > theirs).sum())
                row[measure + " -"] = int((ours < theirs).sum())
                row[measure + " p-value"] = float(stats.ttest_rel(ours, theirs).pvalue)
        rows.append(row)
    result = pd.DataFrame(rows)
    if baseline is not None and cfg.correction:
        others = result["name"] != baseline
        for measure in measures:
            column = measure + " p-value"
            if column in result and others.sum() > 0:
                _, corrected, _, _ = multipletests(result.loc[others, column].fillna(1.0), method=cfg.correction)
                result.loc[others, column + " corrected"] = corrected
    return result


def _group_of(groups: Dict[str, List[str]], system: Optional[str]) -> Optional[str]:
    return next((g for g, names in groups.items() if system in names), None)


def _per_query_mean(per_query: pd.DataFrame, names: List[str]) -> pd.DataFrame:
    """Each (query, measure)'s value averaged over the systems ``names`` (a query a system did not
    rank counts 0 for it, as in ``pt.Experiment``)."""
    rows = per_query[per_query["name"].isin(names)]
    wide = rows.pivot_table(index=["qid", "measure"], columns="name", values="value", aggfunc="first")
    return wide.reindex(columns=names).fillna(0.0).mean(axis=1).rename("value").reset_index()


def _paired(ours: pd.DataFrame, theirs: pd.DataFrame, measure: str):
    """The two systems' values of ``measure`` on the queries either has, in the same order."""
    a = ours[ours["measure"] == measure].set_index("qid")["value"]
    b = theirs[theirs["measure"] == measure].set_index("qid")["value"]
    qids = a.index.union(b.index)
    return a.reindex(qids).fillna(0.0).to_numpy(), b.reindex(qids).fillna(0.0).to_numpy()


def markdown_over_seeds(table: pd.DataFrame, measures: List[str]) -> List[str]:
    """The over-seeds table as markdown: mean ± sd, wins/losses and the corrected p-value."""
    header = ["name", "seeds"]
    for m in measures:
        header += [m, f"{m} + / -", f"{m} p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        cells = [str(row["name"]), str(int(row["seeds"]))]
        for m in measures:
            sd = row.get(m + SD)
            cells.append(f"{row[m]:.4f}" + ("" if sd is None or pd.isna(sd) else f" ± {sd:.4f}"))
            wins = row.get(m + " +")
            cells.append("" if wins is None or pd.isna(wins) else f"{int(wins)} / {int(row[m + ' -'])}")
            p = row.get(m + " p-value corrected", row.get(m + " p-value"))
            cells.append("" if p is None or pd.isna(p) else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
