"""The experiment's report, ``results.md``: what was trained on what, how training went, and one
``pt.Experiment`` table per evaluation set."""
from __future__ import annotations

from typing import Dict, List, Optional

import pandas as pd

from ..tables import compact, markdown_table
from .seeds import SD, baseline_group, markdown_over_seeds
from .specs import Config


def markdown(cfg: Config, tables: Dict[str, pd.DataFrame], held_out: Dict[str, int],
             training: pd.DataFrame, over_seeds: Optional[Dict[str, pd.DataFrame]] = None) -> str:
    """The report of a run of ``cfg``: its tables (measures, wins/losses, corrected p-values),
    with several seeds each system over its seeds (``over_seeds``), the training queries left
    out, and a row per trained system (``training``)."""
    specs = {s.name: s for s in cfg.evaluate}
    lines: List[str] = [f"# {cfg.name}", ""]
    baseline = f"; paired t-tests against {cfg.baseline}" if cfg.baseline else ""
    correction = f", {cfg.correction} correction" if cfg.correction and cfg.baseline else ""
    lines += [f"Trained on {cfg.train.describe()}{baseline}{correction}.", ""]
    for name, count in held_out.items():
        lines += [f"{count} training queries that evaluation set {name} also holds were left out of training.", ""]
    for name, table in tables.items():
        lines += [f"## {name}", "", f"{specs[name].describe()}.", ""]
        lines += markdown_table(compact(table)) + [""]
        if over_seeds and name in over_seeds:
            seeds = over_seeds[name]
            measures = [c for c in seeds.columns if c + SD in seeds.columns]
            lines += [f"### {name}, over seeds {', '.join(map(str, sorted({s.seed for s in cfg.systems})))}", "",
                      "Mean ± sd of each system's value over its seeds; + / − and p: the per-query values "
                      f"averaged over the seeds, paired t-test against {baseline_group(cfg)}"
                      + (f" ({cfg.correction} correction)." if cfg.correction else "."), ""]
            lines += markdown_over_seeds(seeds, measures) + [""]
    if len(training):
        lines += ["## Training", "", "Steps, query groups and minutes of each system (from its log).", ""]
        lines += markdown_table(training) + [""]
    return "\n".join(lines)
