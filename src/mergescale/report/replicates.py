"""Means and intervals over base replicates, the unit of inference, for figures and tables.

A base checkpoint (size + quality + replicate) is one independent trained model; its
expert subsets, methods and tasks are not independent of each other. So a figure's or
table's interval is taken over replicates: each replicate's mean over its rows first,
then the mean over replicates and a Student's t interval. With one replicate there is
no interval (NaN), and `interval_note` says so in words.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

LEVEL = 0.95


def over_replicates(table: pd.DataFrame, column: str, keys: list[str], level: float = LEVEL
                    ) -> pd.DataFrame:
    """Per `keys`: mean over replicates of each replicate's mean of `column` (over every row
    not told apart by `keys`: subsets, and methods, qualities or k when not in `keys`), the
    t interval (low, high; NaN with one replicate) and the number of replicates."""
    columns = [*keys, "mean", "low", "high", "replicates"]
    rows = table[table[column].notna()] if column in table.columns else table.iloc[:0]
    if rows.empty:  # typed, so that arithmetic on the empty columns stays numeric
        return pd.DataFrame({c: pd.Series(dtype=float) for c in columns})
    replicate = rows["replicate"].fillna(0) if "replicate" in rows.columns else 0
    # a column read back with empty cells can be of object dtype: means must be floats
    values = pd.to_numeric(rows[column], errors="coerce").astype(float)
    per = rows.assign(replicate=replicate, **{column: values}).groupby([*keys, "replicate"])[column].mean()
    out = per.groupby(level=list(range(len(keys)))).agg(["mean", "std", "count"]).reset_index()
    n = out["count"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(n >= 2, sps.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)), np.nan)
        half = t * out["std"].to_numpy(float) / np.sqrt(n)
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    out["replicates"] = out["count"].astype(int)
    return out[columns]


def interval_note(replicate_counts) -> str:
    """What the error bars are, in words, from the replicate counts of the plotted cells."""
    counts = np.asarray(list(replicate_counts), int)
    if not len(counts) or counts.max() <= 1:
        return "one base replicate per cell: no interval"
    low, high = counts.min(), counts.max()
    span = str(high) if low == high else f"{low}-{high}"
    text = f"bars: {LEVEL:.0%} t-interval over {span} base replicates"
    return text + (" (none where there is one)" if low <= 1 else "")
