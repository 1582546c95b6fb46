"""Turn per-model scores.json files into tidy tables and normalised summaries.

Normalisation follows Yadav et al. (2024): a merged model's held-in score on task t is
divided by the score of t's own expert; its held-out score by the base model's score;
both are also reported relative to the multitask model trained on the same expert
subset. Ratios whose denominator is below MIN_DENOMINATOR are left out of the mean (and
counted), never silently turned into zeros; a ratio of sums and a raw difference stand
beside each mean of ratios. docs/findings.md documents every column of normalized.csv.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mergescale.tasks.combos import ALL_HELD_IN, parse_combo
from mergescale.tasks import get_family

REPORT_SPLIT = "test"
KINDS = {"bases": "base", "experts": "expert", "multitask": "multitask", "merged": "merged",
         "ensembles": "ensemble", "sparse": "sparse"}
# Rows of normalized.csv that are references, not merge methods.
REFERENCES = ("base", "multitask", "ensemble")
# A denominator score below this counts as near zero (exact match 0.05 = 10 of 200 test
# examples): a ratio over it says more about the denominator's noise than about the
# numerator, so it is dropped from a mean of ratios and counted.
MIN_DENOMINATOR = 0.05
# Chance on a generative exact-match task is about 0; a multitask model is "above chance"
# on a task when it scores at least this. 'vs multitask' uses only such tasks.
MULTITASK_CHANCE = MIN_DENOMINATOR


def describe_model(path: str) -> dict:
    """Parse results/evals/<kind>/<base>/... into its identifying columns."""
    parts = Path(path).parts
    i = parts.index("evals")
    kind, base, *rest = parts[i + 1 : -1]
    row = {"kind": KINDS[kind], "base": base, "method": None, "combo": None, "expert_task": None}
    if kind == "bases":
        row["method"] = "base"
    elif kind == "experts":
        row["method"], row["expert_task"] = "expert", rest[0]
    elif kind in ("multitask", "ensembles"):
        row["method"], row["combo"] = KINDS[kind], rest[0]
    elif kind == "sparse":  # sparse/<base>/<task>/c<cycle>/<soup|best_copy> (Sparse Model Soups)
        row["method"], row["expert_task"] = f"sparse_{rest[2]}", rest[0]
    else:
        row["method"], row["combo"] = rest[0], rest[1]
    row["model"] = "/".join(parts[i + 1 : -1])
    return row


def _cost_columns(card: dict, merged: bool) -> dict:
    """Runtime and memory of a merge: the whole job (a data-aware fit included) and, for
    methods reading statistics, the compute_stats jobs it used (summed, peak). Only merges
    have them (a training card's wall time is training)."""
    if not merged:
        return dict.fromkeys(COST_COLUMNS)
    fit = card.get("fit", {}).get("seconds")
    # cards of compute_stats jobs (statistics a fit computed itself have none: its cost is the fit's)
    stats = [c for c in card.get("stats", {}).get("cards", []) if c]
    return {
        "merge_seconds": None if card.get("wall_time_s") is None else card["wall_time_s"] + (fit or 0),
        "merge_peak_rss_mb": (card["peak_rss_bytes"] / 2**20) if "peak_rss_bytes" in card else None,
        "fit_seconds": fit,
        "stats_seconds": sum(c.get("seconds", 0) for c in stats) if stats else None,
        "stats_peak_rss_mb": max(c.get("peak_rss_bytes", 0) for c in stats) / 2**20 if stats else None,
        "merge_params": json.dumps(card["params"], sort_keys=True) if "params" in card else None,
        # methods that keep per-expert parts beside a merged model (Twin-Merging)
        "exclusive_storage_mb": (card["storage_bytes"]["exclusive"] / 2**20
                                 if "exclusive" in card.get("storage_bytes", {}) else None),
    }


COST_COLUMNS = ("merge_seconds", "merge_peak_rss_mb", "fit_seconds", "stats_seconds",
                "stats_peak_rss_mb", "merge_params", "exclusive_storage_mb")


def _trained_tasks(meta: dict, combos: dict[str, list[str]], held_in: list[str]) -> set[str]:
    if meta["kind"] in ("expert", "sparse"):
        return {meta["expert_task"]}
    if meta["combo"] == ALL_HELD_IN:
        return set(held_in)
    if meta["combo"] is not None:
        return set(combos[meta["combo"]])
    return set()


def tidy_scores(score_files: list[str], held_in: list[str], held_out: list[str],
                combos: dict[str, list[str]], base_labels: dict[str, dict] | None = None
                ) -> pd.DataFrame:
    """One row per model x task x split, with the model's base labels and merge cost."""
    rows = []
    for path in score_files:
        meta = describe_model(path)
        record = json.loads(Path(path).read_text())
        card = record.get("model_card", {})
        labels = (base_labels or {}).get(meta["base"], {})
        trained = _trained_tasks(meta, combos, held_in)
        k = parse_combo(meta["combo"])[0] if meta["combo"] not in (None, ALL_HELD_IN) else None
        for s in record["scores"]:
            rows.append({
                **meta, "k": k,
                "size": labels.get("size", meta["base"]), "quality": labels.get("quality", ""),
                "replicate": labels.get("replicate", 0), "parameters": labels.get("parameters"),
                "task": s["task"], "split": s["split"],
                # lm-eval tasks (tasks.lm_eval) carry their cluster in the score row.
                "cluster": s.get("cluster") or get_family(s["task"]).cluster,
                "role": "held_in" if s["task"] in held_in else (
                    "held_out" if s["task"] in held_out else "other"),
                "trained_on": s["task"] in trained,
                "metric": s["metric"], "value": s["value"], "stderr": s["stderr"], "n": s["n"],
                # measured sparsity of pruned models (Sparse Model Soups); empty for dense ones
                "sparsity": card.get("sparsity") if meta["kind"] == "sparse" else None,
                **_cost_columns(card, merged=meta["kind"] == "merged"),
            })
    df = pd.DataFrame(rows)
    return df.sort_values(["base", "kind", "method", "combo", "expert_task", "task", "split"],
                          na_position="first").reset_index(drop=True)


def _ratio_mean(num: pd.Series, den: pd.Series) -> tuple[float, int]:
    """Mean of num/den over entries with den >= MIN_DENOMINATOR, and how many were dropped."""
    ok = den >= MIN_DENOMINATOR
    if not ok.any():
        return float("nan"), int((~ok).sum())
    return float((num[ok] / den[ok]).mean()), int((~ok).sum())


def _ratio_of_sums(num: pd.Series, den: pd.Series, keep: pd.Series | None = None) -> float:
    """sum(num) / sum(den) over tasks with both scores (and `keep`); NaN when the mean
    denominator is below MIN_DENOMINATOR. One weak task cannot blow it up."""
    ok = num.notna() & den.notna() & (True if keep is None else keep)
    if not ok.any() or den[ok].mean() < MIN_DENOMINATOR:
        return float("nan")
    return float(num[ok].sum() / den[ok].sum())


def _mean_difference(num: pd.Series, den: pd.Series) -> float:
    diff = (num - den).dropna()
    return float(diff.mean()) if len(diff) else float("nan")


def robust_columns(hi: pd.Series, ho: pd.Series, expert: pd.Series, base: pd.Series,
                   multi_in: pd.Series, multi_out: pd.Series) -> dict:
    """Ratio-of-sums and raw-difference columns of one model (tasks aligned by index), and
    the counts of tasks a 'vs multitask' ratio leaves out (multitask at or below chance)."""
    above_in, above_out = multi_in >= MULTITASK_CHANCE, multi_out >= MULTITASK_CHANCE
    return {
        "held_in_ratio_of_sums": _ratio_of_sums(hi, expert),
        "held_out_ratio_of_sums": _ratio_of_sums(ho, base),
        "held_in_vs_multitask_ratio_of_sums": _ratio_of_sums(hi, multi_in, above_in),
        "held_out_vs_multitask_ratio_of_sums": _ratio_of_sums(ho, multi_out, above_out),
        "held_in_minus_expert": _mean_difference(hi, expert),
        "held_out_minus_base": _mean_difference(ho, base),
        "held_in_minus_multitask": _mean_difference(hi, multi_in),
        "held_out_minus_multitask": _mean_difference(ho, multi_out),
        "held_in_low_multitask_tasks": int((~above_in).sum()),
        "held_out_low_multitask_tasks": int((~above_out).sum()),
    }


def _scores_of(group: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(group), dtype=bool)
    for column, value in where.items():
        mask &= (group[column] == value).to_numpy()
    return group[mask].set_index("task")["value"]


def normalized_scores(scores: pd.DataFrame, held_in: list[str], held_out: list[str],
                      combos: dict[str, list[str]]) -> pd.DataFrame:
    """One row per (base, method, combo): every merged model, and the references
    (base zero-shot, multitask on the subset, output ensemble) for each subset."""
    test = scores[scores["split"] == REPORT_SPLIT]
    out = []
    for base, group in test.groupby("base"):
        first_of_base = group.iloc[0]
        base_score = _scores_of(group, kind="base")
        expert = group[(group.kind == "expert") & (group.task == group.expert_task)]
        expert_score = expert.set_index("task")["value"]
        for combo, tasks_in in combos.items():
            if not (group.combo == combo).any():
                continue  # a subset this base does not merge (its own `ks`): no reference rows
            # the subset's own multitask model (per_subset), else the base's one on all held-in tasks
            per_subset = (group.kind == "multitask") & (group.combo == combo)
            multi = _scores_of(group, kind="multitask",
                               combo=combo if per_subset.any() else ALL_HELD_IN)
            candidates = [("base", base_score, None)]
            if not per_subset.any() and len(multi):
                candidates.append(("multitask", multi, None))
            for (method, kind), model in group[group.combo == combo].groupby(["method", "kind"]):
                # merge cost only for merges (a multitask card's wall time is training)
                first = model.iloc[0] if kind == "merged" else None
                candidates.append((method, model.set_index("task")["value"], first))
            for method, v, first in candidates:
                hi, ho = v.reindex(tasks_in), v.reindex(held_out)
                hi_norm, hi_drop = _ratio_mean(hi, expert_score.reindex(tasks_in))
                ho_norm, ho_drop = _ratio_mean(ho, base_score.reindex(held_out))
                hi_mt, _ = _ratio_mean(hi, multi.reindex(tasks_in))
                ho_mt, _ = _ratio_mean(ho, multi.reindex(held_out))
                robust = robust_columns(hi, ho, expert_score.reindex(tasks_in),
                                        base_score.reindex(held_out), multi.reindex(tasks_in),
                                        multi.reindex(held_out))
                out.append({
                    "base": base, "size": first_of_base["size"], "quality": first_of_base["quality"],
                    "replicate": first_of_base["replicate"], "parameters": first_of_base["parameters"],
                    "method": method, "reference": method in REFERENCES,
                    "combo": combo, "k": len(tasks_in),
                    "held_in_raw": float(hi.mean()),
                    "held_out_raw": float(ho.mean()) if held_out else float("nan"),
                    "held_in_normalized": hi_norm, "held_out_normalized": ho_norm,
                    "held_in_vs_multitask": hi_mt, "held_out_vs_multitask": ho_mt,
                    "held_out_zero_base_tasks": ho_drop, "held_in_zero_expert_tasks": hi_drop,
                    **robust,
                    **{c: None if first is None else first[c] for c in COST_COLUMNS},
                })
    return pd.DataFrame(out).sort_values(["base", "method", "k", "combo"]).reset_index(drop=True)


METRICS = {
    "held_in_normalized": "held-in (norm.)",
    "held_out_normalized": "held-out (norm.)",
    "held_in_vs_multitask": "held-in vs multitask",
    "held_out_vs_multitask": "held-out vs multitask",
}


def method_table(normalized: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over expert subsets per size x base x method x k."""
    keys = ["size", "parameters", "quality", "base", "method", "k"]
    named = {"subsets": ("combo", "count"),
             "merge_seconds": ("merge_seconds", "mean"),
             "merge_peak_rss_mb": ("merge_peak_rss_mb", "max"),
             "stats_seconds": ("stats_seconds", "mean"),
             "stats_peak_rss_mb": ("stats_peak_rss_mb", "max"),
             "exclusive_storage_mb": ("exclusive_storage_mb", "mean")}
    for column in METRICS:
        named[f"{column}_mean"] = (column, "mean")
        named[f"{column}_std"] = (column, "std")
    table = normalized.groupby(keys, dropna=False).agg(**named).reset_index()
    return table.sort_values(["parameters", "quality", "base", "method", "k"]).reset_index(drop=True)


def _fmt(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if pd.notna(std) else f"{mean:.3f}"


def _display(table: pd.DataFrame) -> pd.DataFrame:
    shown = {"size": table["size"], "base": table.base, "quality": table.quality,
             "method": table.method, "k": table.k, "subsets": table.subsets}
    for column, label in METRICS.items():
        shown[label] = [_fmt(m, s) for m, s in zip(table[f"{column}_mean"], table[f"{column}_std"])]
    shown["merge s"] = [f"{x:.2f}" if pd.notna(x) else "-" for x in table.merge_seconds]
    shown["merge peak RSS MiB"] = [f"{x:.0f}" if pd.notna(x) else "-" for x in table.merge_peak_rss_mb]
    # data-aware methods: the compute_stats jobs of the merged experts (seconds summed)
    shown["stats s"] = [f"{x:.2f}" if pd.notna(x) else "-" for x in table.stats_seconds]
    shown["stats peak RSS MiB"] = [f"{x:.0f}" if pd.notna(x) else "-" for x in table.stats_peak_rss_mb]
    shown["exclusive parts MiB"] = [f"{x:.2f}" if pd.notna(x) else "-" for x in table.exclusive_storage_mb]
    return pd.DataFrame(shown)


def markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"),
                       ("#", r"\#"), ("±", r"$\pm$")):
        text = text.replace(char, repl)
    return text


def latex_table(df: pd.DataFrame, caption: str) -> str:
    """A booktabs table (no pandas Styler: that would pull in jinja2 for one table)."""
    cols = list(df.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{" + "l" * 4 + "r" * (len(cols) - 4) + "}", r"\toprule",
             " & ".join(_latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for _, r in df.iterrows():
        lines.append(" & ".join(_latex_escape(str(r[c])) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(caption)}}}",
              r"\end{table}", ""]
    return "\n".join(lines)


TABLE_CAPTION = ("Normalised held-in (merged / the task's expert) and held-out (merged / base) "
                 "exact match, and both relative to the multitask model of the same expert "
                 "subset; mean ± standard deviation over expert subsets; merge runtime and peak "
                 "memory (a data-aware fit included), and the statistics pass the merge read.")


def summary_markdown(scores: pd.DataFrame, normalized: pd.DataFrame, held_in: list[str],
                     held_out: list[str]) -> str:
    test = scores[scores["split"] == REPORT_SPLIT]
    parts = ["# mergescale summary", "",
             f"Held-in tasks: {', '.join(held_in)}. Held-out tasks: {', '.join(held_out) or 'none'}.",
             f"Scores: exact match on the {REPORT_SPLIT} split (lm-eval). " + TABLE_CAPTION,
             "Rows `base`, `multitask` and `ensemble` are references, not merges.", ""]
    parts += ["## Merged models", "", markdown_table(_display(method_table(normalized))), ""]
    gains = []
    for base, group in test.groupby("base"):
        b = _scores_of(group, kind="base")
        e = group[(group.kind == "expert") & (group.task == group.expert_task)].set_index("task")["value"]
        for task in held_in:
            gains.append({"base": base, "task": task, "base score": f"{b.get(task, np.nan):.3f}",
                          "expert": f"{e.get(task, np.nan):.3f}",
                          "expert gain": f"{e.get(task, np.nan) - b.get(task, np.nan):+.3f}"})
        for task in held_out:
            gains.append({"base": base, "task": f"{task} (held-out)",
                          "base score": f"{b.get(task, np.nan):.3f}", "expert": "-",
                          "expert gain": "-"})
    parts += ["## Reference models (raw exact match)", "", markdown_table(pd.DataFrame(gains)), ""]
    return "\n".join(parts)


def summary_latex(normalized: pd.DataFrame) -> str:
    return latex_table(_display(method_table(normalized)), TABLE_CAPTION)
