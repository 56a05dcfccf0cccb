"""``pt.Experiment`` tables for reading: the columns that matter, as text or markdown."""
from __future__ import annotations

from typing import Any, List

import pandas as pd


def compact(table: pd.DataFrame) -> pd.DataFrame:
    """The columns worth reading on a terminal: measures, wins/losses and corrected p-values."""
    extras = (" +", " -", " p-value", " reject", " p-value corrected")
    keep = [c for c in table.columns if not c.endswith(extras)]
    keep += [c for c in table.columns if c.endswith((" +", " -", " p-value corrected"))]
    return table[keep]


def markdown_table(table: pd.DataFrame) -> List[str]:
    """A table as markdown lines (measures to 4 places, p-values to 3 or 2 significant digits)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(c, v) for c, v in zip(table.columns, row)) + " |")
    return lines


def _cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if column.endswith((" +", " -")):
        return str(int(value))  # wins and losses (floats only because the baseline row has none)
    if column.endswith("p-value corrected") or column.endswith("p-value"):
        return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"
    if column == "minutes":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


