"""The world a run's merges live in: per (size, quality), the bases, experts and references.

The claims mean something only in a world with the paper's structure (docs/tiny-world.md):
a base that does held-out tasks zero-shot, experts that learn their task, task vectors
that stay small next to the base, merges that keep most of what two experts know. This
module measures each of these per base checkpoint from a run's tables, then summarises
them per (size, quality) over the pretraining-seed replicates and checks them against the
thresholds the tiny world was designed to meet:

    scores.csv         base zero-shot exact match (held-out, held-in), each expert's gain
                       over its base on its own task, the multitask reference's held-in score
    normalized.csv     at k = 2, the best of the paper's four methods' normalised held-in
    task_vectors/*.json  per base: relative task-vector norm and pairwise cosine (optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mergescale.report.aggregate import markdown_table
from mergescale.report.findings import PAPER_METHODS, QUALITY_ORDER, FindingsInputError
from mergescale.report.plots import merged_rows, metric_column
from mergescale.tasks.combos import ALL_HELD_IN

SCORE_COLUMNS = ("kind", "base", "task", "role", "value", "size", "quality")
WORLD_K = 2
# (column, label) of the per-base measures, in the table's order
MEASURES = {
    "held_out_zero_shot": "held-out zero-shot",
    "held_in_zero_shot": "held-in zero-shot",
    "expert_gain_mean": "expert gain",
    "expert_gain_min": "smallest expert gain",
    "relative_norm": "‖τ‖ ÷ ‖θ_base‖",
    "cosine": "cos(τ_i, τ_j)",
    "multitask_held_in": "multitask held-in",
    "k2_best_of_four": f"k = {WORLD_K} best of four",
}


@dataclass(frozen=True)
class Thresholds:
    """What the tiny world was designed to reach (docs/tiny-world.md)."""
    held_out_zero_shot: float = 0.2   # the base's mean exact match over held-out tasks
    expert_gain: float = 0.3          # every expert over its base, on its own task
    k2_best_of_four: float = 0.6      # normalised held-in at k = 2, best of the paper's four
    quality_gap: float = 0.1          # per size, two qualities' held-out zero-shot, in label order


THRESHOLDS = Thresholds()


def read_scores(path) -> pd.DataFrame:
    """scores.csv of the aggregate rule: the test split's exact-match rows."""
    path = Path(path)
    table = pd.read_csv(path)
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise FindingsInputError(f"{path}: missing column(s) {', '.join(missing)}")
    if "split" in table.columns:
        table = table[table.split == "test"]
    if "metric" in table.columns:
        table = table[table.metric == "exact_match"]
    return table


def read_task_vectors(directory) -> dict[str, dict] | None:
    """{base: the compute_task_vector_stats record} of tables/task_vectors/, None without any."""
    files = sorted(Path(directory).glob("*.json")) if Path(directory).is_dir() else []
    if not files:
        return None
    out = {}
    for file in files:
        try:
            record = json.loads(file.read_text())
            record["experts"], record["cosine"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FindingsInputError(f"{file}: not a task-vector record ({e})") from e
        out[file.stem] = record
    return out


def _mean_over_models(rows: pd.DataFrame, model: str) -> pd.Series:
    """Per base: the mean over its models of each model's mean score over its rows."""
    return rows.groupby(["base", model]).value.mean().groupby(level="base").mean()


def per_base(scores: pd.DataFrame, normalized: pd.DataFrame,
             task_vectors: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per base checkpoint: its labels and the MEASURES (NaN where the run lacks
    the rows; the task-vector columns only when `task_vectors` is given)."""
    value = pd.to_numeric(scores.value, errors="coerce")
    scores = scores.assign(value=value)
    bases = scores[scores.kind == "base"]
    # labels from the base's own rows (a missing replicate column: one replicate)
    table = (bases.drop_duplicates("base").set_index("base")
             .reindex(columns=["size", "quality", "replicate", "parameters"]))
    table["replicate"] = table.replicate.fillna(0)

    for role in ("held_out", "held_in"):
        mean = bases[bases.role == role].groupby("base").value.mean()
        table[f"{role}_zero_shot"] = mean.reindex(table.index)

    # each expert's score on its own task minus its base's
    experts = scores[scores.kind == "expert"]
    experts = (experts[experts.task == experts["expert_task"]] if "expert_task" in experts
               else experts.iloc[:0])
    gains = experts.merge(bases[["base", "task", "value"]], on=["base", "task"],
                          suffixes=("", "_base"))
    gain = (gains.value - gains.value_base).groupby(gains.base)
    table["expert_gain_mean"] = gain.mean().reindex(table.index)
    table["expert_gain_min"] = gain.min().reindex(table.index)

    if task_vectors is not None:
        from mergescale.merge.task_vectors import stats_rows

        stats = pd.DataFrame([row for base, record in task_vectors.items()
                              for row in stats_rows(base, record)]).set_index("base")
        table["relative_norm"] = stats.relative_norm_mean.reindex(table.index)
        table["cosine"] = stats.cosine_mean.reindex(table.index)

    # the multitask reference on the held-in tasks it trained on: the one model on all
    # held-in tasks where the base has it, else the mean over its per-subset models
    multi = scores[(scores.kind == "multitask") & (scores.role == "held_in")]
    if "trained_on" in multi.columns:
        multi = multi[multi.trained_on.astype(str).str.lower() == "true"]
    if "combo" in multi.columns:
        has_all = multi.groupby("base").combo.transform(lambda c: (c == ALL_HELD_IN).any())
        multi = multi[~has_all.astype(bool) | (multi.combo == ALL_HELD_IN)]
    table["multitask_held_in"] = _mean_over_models(
        multi, "combo" if "combo" in multi.columns else "kind").reindex(table.index)

    # at k = 2, each of the paper's four: mean over subsets; the best method per base
    merged = merged_rows(normalized)
    merged = merged[merged.method.isin(PAPER_METHODS) & (merged.k == WORLD_K)]
    column = metric_column(normalized, "held_in")
    per_method = merged.assign(v=pd.to_numeric(merged[column], errors="coerce")).groupby(
        ["base", "method"]).v.mean()
    table["k2_best_of_four"] = per_method.groupby(level="base").max().reindex(table.index)
    return table.reset_index()


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by size (parameters), then quality weaker to stronger, variants after."""
    rank = {q: i for i, q in enumerate(QUALITY_ORDER)}
    return (table.assign(_q=table.quality.map(lambda q: (rank.get(q, len(rank)), str(q))),
                         _p=table.parameters if "parameters" in table else 0)
            .sort_values(["_p", "size", "_q"], kind="stable").drop(columns=["_q", "_p"]))


def world_table(bases: pd.DataFrame, thresholds: Thresholds = THRESHOLDS) -> pd.DataFrame:
    """Per (size, quality): the replicates n; per measure its mean, min and max over
    replicates (`<measure>`, `<measure>_min`, `<measure>_max`); the smallest gain of any
    expert of any replicate; and each check (True, False, or None where not measured):
    mean held-out zero-shot, every expert's gain, mean k = 2 best of four."""
    keys = ["size", "quality"]
    measures = [m for m in MEASURES if m in bases.columns]
    grouped = bases.groupby(keys, sort=False, dropna=False)
    table = grouped.agg(parameters=("parameters", "first"), n=("base", "size")).reset_index()
    for m in measures:
        stats = grouped[m].agg(["mean", "min", "max"]).reset_index(drop=True)
        table[m], table[f"{m}_min"], table[f"{m}_max"] = stats["mean"], stats["min"], stats["max"]

    def check(values, threshold):
        return [None if pd.isna(v) else bool(v >= threshold) for v in values]

    table["held_out_ok"] = check(table.held_out_zero_shot, thresholds.held_out_zero_shot)
    # every expert: the smallest gain of any expert of any replicate
    table["gains_ok"] = check(table.expert_gain_min_min, thresholds.expert_gain)
    table["k2_ok"] = check(table.k2_best_of_four, thresholds.k2_best_of_four)
    return _ordered(table).reset_index(drop=True)


def quality_gaps(table: pd.DataFrame, thresholds: Thresholds = THRESHOLDS) -> pd.DataFrame:
    """Per size: the largest held-out zero-shot gap between two base qualities of
    QUALITY_ORDER in the order of their labels (stronger label minus weaker, means over
    replicates), the pair, and whether it reaches the threshold (None with under two)."""
    rows = []
    for size, group in table.groupby("size", sort=False):
        scores = {q: v for q, v in zip(group.quality, group.held_out_zero_shot)
                  if q in QUALITY_ORDER and pd.notna(v)}
        ordered = [q for q in QUALITY_ORDER if q in scores]
        pairs = [(scores[b] - scores[a], a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:]]
        gap, weaker, stronger = max(pairs) if pairs else (np.nan, None, None)
        rows.append({"size": size, "qualities": ordered, "scores": [scores[q] for q in ordered],
                     "gap": gap, "weaker": weaker, "stronger": stronger,
                     "ok": None if not pairs else bool(gap >= thresholds.quality_gap)})
    return pd.DataFrame(rows)


def _cell(row, measure: str) -> str:
    mean = row[measure]
    if pd.isna(mean):
        return "n/a"
    low, high = f"{row[f'{measure}_min']:.3f}", f"{row[f'{measure}_max']:.3f}"
    # one replicate, or replicates that agree to the shown precision: no range
    return f"{mean:.3f}" if row["n"] < 2 or low == high else f"{mean:.3f} ({low} to {high})"


CHECK_NAMES = {"held_out_ok": "held-out", "gains_ok": "expert gain", "k2_ok": f"k = {WORLD_K}"}


def _checks(row) -> str:
    missed = [name for c, name in CHECK_NAMES.items() if row[c] is False]
    absent = [name for c, name in CHECK_NAMES.items() if row[c] is None]
    text = f"miss: {', '.join(missed)}" if missed else "pass"
    return text + (f" (n/a: {', '.join(absent)})" if absent else "")


def world_lines(results_dir, normalized: pd.DataFrame, thresholds: Thresholds = THRESHOLDS
                ) -> list[str]:
    """The results page's section "The world" (without its heading)."""
    results_dir = Path(results_dir)
    scores_path = results_dir / "tables" / "scores.csv"
    if not scores_path.is_file():
        return [f"No `{scores_path.name}` in `{results_dir}/tables/`: the bases and experts "
                "of this run are not described.", ""]
    task_vectors = read_task_vectors(results_dir / "tables" / "task_vectors")
    bases = per_base(read_scores(scores_path), normalized, task_vectors)
    if bases.empty:
        return [f"`{scores_path}` has no base model's scores: the world is not described.", ""]
    table = world_table(bases, thresholds)
    shown = [m for m in MEASURES if m in table.columns]
    page = pd.DataFrame({"size": table["size"], "quality": table.quality, "n": table.n,
                         **{MEASURES[m]: [_cell(r, m) for _, r in table.iterrows()] for m in shown},
                         "checks": [_checks(r) for _, r in table.iterrows()]})
    t, k, column = thresholds, WORLD_K, metric_column(normalized, "held_in")
    lines = [
        "The bases, their experts and references, one row per size and base quality: each "
        "cell is the mean over the n pretraining-seed replicates, with their range in "
        "parentheses when they differ; exact match on the test split.", "",
        markdown_table(page), "",
        "- *held-out zero-shot*, *held-in zero-shot*: the base, mean over the held-out "
        "(held-in) tasks.",
        "- *expert gain*, *smallest expert gain*: an expert's score on its own task minus its "
        "base's, mean and smallest over the base's experts.",
        "- *‖τ‖ ÷ ‖θ_base‖*, *cos(τ_i, τ_j)*: the norm of an expert's task vector relative to "
        "its base's weights (mean over experts), and the cosine between two experts' task "
        "vectors (mean over pairs)." if "relative_norm" in table.columns else
        "- Task vectors: not measured in this run (no `tables/task_vectors/*.json`, written "
        "by the rule `compute_task_vector_stats`).",
        "- *multitask held-in*: the multitask reference on the held-in tasks it trained on.",
        f"- *k = {k} best of four*: normalised held-in (merged ÷ each task's expert"
        + (", ratio of sums" if column.endswith("ratio_of_sums") else "")
        + f") of the best of the paper's four methods ({', '.join(PAPER_METHODS)}): each "
        "method's mean over the expert subsets, the best method per base.",
        f"- *checks*, against what the tiny world was designed to reach "
        f"([tiny-world.md](tiny-world.md)): held-out zero-shot (mean over replicates) at "
        f"least {t.held_out_zero_shot:g}; every expert's gain (the smallest over the experts "
        f"of every replicate) at least {t.expert_gain:g}; k = {k} best of four (mean over "
        f"replicates) at least {t.k2_best_of_four:g}. Per size, two base qualities should "
        f"differ by at least {t.quality_gap:g} in held-out zero-shot, in the order of their "
        "labels:"]
    for _, gap in quality_gaps(table, thresholds).iterrows():
        scores = ", ".join(f"{q} {v:.3f}" for q, v in zip(gap.qualities, gap.scores))
        if gap.ok is None:
            verdict = (f"n/a ({len(gap.qualities)} of the qualities "
                       f"{', '.join(QUALITY_ORDER)} in this run)")
        else:
            verdict = (f"{gap.gap:+.3f} ({gap.stronger} − {gap.weaker}), "
                       f"{'pass' if gap.ok else 'miss'}")
        lines.append(f"  - Size {gap['size']}: held-out zero-shot "
                     + (f"{scores}" if scores else "n/a") + f"; largest gap in label order {verdict}.")
    return lines + [""]
