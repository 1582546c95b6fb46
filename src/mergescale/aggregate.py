"""Turn per-model scores.json files into tidy tables and normalised summaries.

Normalisation follows Yadav et al. (2024): a merged model's held-in score on task t is
divided by the score of t's own expert; its held-out score by the base model's score;
both are also reported relative to the multitask model. Ratios whose denominator is
zero are left out of the mean (and counted), never silently turned into zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mergescale.combos import parse_combo
from mergescale.tasks import get_family

REPORT_SPLIT = "test"


def describe_model(path: str) -> dict:
    """Parse results/evals/<kind>/<base>/... into its identifying columns."""
    parts = Path(path).parts
    i = parts.index("evals")
    kind, base, *rest = parts[i + 1 : -1]
    row = {"kind": {"bases": "base", "experts": "expert", "multitask": "multitask",
                    "merged": "merged"}[kind], "base": base, "method": None, "combo": None,
           "expert_task": None}
    if kind == "bases":
        row["method"] = "base"
    elif kind == "experts":
        row["method"], row["expert_task"] = "expert", rest[0]
    elif kind == "multitask":
        row["method"], row["combo"] = "multitask", rest[0]
    else:
        row["method"], row["combo"] = rest[0], rest[1]
    row["model"] = "/".join(parts[i + 1 : -1])
    return row


def _cost_columns(card: dict) -> dict:
    """Runtime and memory of a merge: the whole job (a data-aware fit included) and, for
    methods reading statistics, the compute_stats jobs it used (summed, peak)."""
    fit = card.get("fit", {}).get("seconds")
    # cards of compute_stats jobs (statistics a fit computed itself have none: its cost is the fit's)
    stats = [c for c in card.get("stats", {}).get("cards", []) if c]
    return {
        "merge_seconds": None if card.get("wall_time_s") is None else card["wall_time_s"] + (fit or 0),
        "merge_peak_rss_mb": (card["peak_rss_bytes"] / 2**20) if "peak_rss_bytes" in card else None,
        "fit_seconds": fit,
        "stats_seconds": sum(c.get("seconds", 0) for c in stats) if stats else None,
        "stats_peak_rss_mb": max(c.get("peak_rss_bytes", 0) for c in stats) / 2**20 if stats else None,
    }


def tidy_scores(score_files: list[str], held_in: list[str], held_out: list[str],
                combos: dict[str, list[str]]) -> pd.DataFrame:
    rows = []
    for path in score_files:
        meta = describe_model(path)
        record = json.loads(Path(path).read_text())
        card = record.get("model_card", {})
        if meta["kind"] == "expert":
            trained = {meta["expert_task"]}
        elif meta["kind"] == "merged":
            trained = set(combos[meta["combo"]])
        elif meta["kind"] == "multitask":
            trained = set(held_in) if meta["combo"] == "all" else set(combos[meta["combo"]])
        else:
            trained = set()
        k = parse_combo(meta["combo"])[0] if meta["combo"] not in (None, "all") else (
            len(held_in) if meta["combo"] == "all" else None)
        for s in record["scores"]:
            rows.append({
                **meta, "k": k, "task": s["task"], "split": s["split"],
                "cluster": get_family(s["task"]).cluster,
                "role": "held_in" if s["task"] in held_in else (
                    "held_out" if s["task"] in held_out else "other"),
                "trained_on": s["task"] in trained,
                "metric": s["metric"], "value": s["value"], "stderr": s["stderr"], "n": s["n"],
                **_cost_columns(card),
            })
    df = pd.DataFrame(rows)
    return df.sort_values(["base", "kind", "method", "combo", "expert_task", "task", "split"],
                          na_position="first").reset_index(drop=True)


def _ratio_mean(num: pd.Series, den: pd.Series) -> tuple[float, int]:
    """Mean of num/den over entries with den > 0, and how many entries were dropped."""
    ok = den > 0
    if not ok.any():
        return float("nan"), int((~ok).sum())
    return float((num[ok] / den[ok]).mean()), int((~ok).sum())


def normalized_scores(scores: pd.DataFrame, held_in: list[str], held_out: list[str],
                      combos: dict[str, list[str]]) -> pd.DataFrame:
    """One row per merged model (and the multitask reference): normalised held-in/out."""
    test = scores[scores["split"] == REPORT_SPLIT]
    out = []
    for base, group in test.groupby("base"):
        base_score = group[group.kind == "base"].set_index("task")["value"]
        expert = group[(group.kind == "expert") & (group.task == group.expert_task)]
        expert_score = expert.set_index("task")["value"]
        multi = group[(group.kind == "multitask") & (group.combo == "all")].set_index("task")["value"]
        candidates = group[group.kind.isin(["merged", "multitask"])]
        for (method, combo), model in candidates.groupby(["method", "combo"]):
            tasks_in = combos[combo] if combo in combos else held_in
            v = model.set_index("task")["value"]
            hi, ho = v.reindex(tasks_in), v.reindex(held_out)
            hi_norm, hi_drop = _ratio_mean(hi, expert_score.reindex(tasks_in))
            ho_norm, ho_drop = _ratio_mean(ho, base_score.reindex(held_out))
            hi_mt, _ = _ratio_mean(hi, multi.reindex(tasks_in))
            ho_mt, _ = _ratio_mean(ho, multi.reindex(held_out))
            first = model.iloc[0]
            out.append({
                "base": base, "method": method, "combo": combo, "k": int(first.k),
                "held_in_raw": float(hi.mean()), "held_out_raw": float(ho.mean()) if held_out else float("nan"),
                "held_in_normalized": hi_norm, "held_out_normalized": ho_norm,
                "held_in_vs_multitask": hi_mt, "held_out_vs_multitask": ho_mt,
                "held_out_zero_base_tasks": ho_drop, "held_in_zero_expert_tasks": hi_drop,
                "merge_seconds": first.merge_seconds, "merge_peak_rss_mb": first.merge_peak_rss_mb,
                "stats_seconds": first.stats_seconds, "stats_peak_rss_mb": first.stats_peak_rss_mb,
            })
    return pd.DataFrame(out).sort_values(["base", "method", "k", "combo"]).reset_index(drop=True)


def _fmt(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if not np.isnan(std) else f"{mean:.3f}"


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def summary_markdown(scores: pd.DataFrame, normalized: pd.DataFrame, held_in: list[str],
                     held_out: list[str]) -> str:
    test = scores[scores["split"] == REPORT_SPLIT]
    parts = ["# mergescale summary", "",
             f"Held-in tasks: {', '.join(held_in)}. Held-out tasks: {', '.join(held_out) or 'none'}.",
             f"Scores: exact match on the {REPORT_SPLIT} split (lm-eval). Normalised held-in = "
             "merged / the task's own expert; normalised held-out = merged / base; "
             "mean ± standard deviation over expert subsets.", ""]
    agg = (normalized.groupby(["base", "method", "k"])
           .agg(subsets=("combo", "count"),
                hi=("held_in_normalized", "mean"), hi_sd=("held_in_normalized", "std"),
                ho=("held_out_normalized", "mean"), ho_sd=("held_out_normalized", "std"),
                himt=("held_in_vs_multitask", "mean"), himt_sd=("held_in_vs_multitask", "std"),
                secs=("merge_seconds", "mean"), rss=("merge_peak_rss_mb", "max"),
                stats_secs=("stats_seconds", "mean"), stats_rss=("stats_peak_rss_mb", "max"))
           .reset_index())
    table = pd.DataFrame({
        "base": agg.base, "method": agg.method, "k": agg.k, "subsets": agg.subsets,
        "held-in (norm.)": [_fmt(m, s) for m, s in zip(agg.hi, agg.hi_sd)],
        "held-out (norm.)": [_fmt(m, s) for m, s in zip(agg.ho, agg.ho_sd)],
        "held-in vs multitask": [_fmt(m, s) for m, s in zip(agg.himt, agg.himt_sd)],
        "merge s": [f"{x:.2f}" if pd.notna(x) else "-" for x in agg.secs],
        "merge peak RSS MiB": [f"{x:.0f}" if pd.notna(x) else "-" for x in agg.rss],
        # data-aware methods: the compute_stats jobs of the merged experts (seconds summed)
        "stats s": [f"{x:.2f}" if pd.notna(x) else "-" for x in agg.stats_secs],
        "stats peak RSS MiB": [f"{x:.0f}" if pd.notna(x) else "-" for x in agg.stats_rss],
    })
    parts += ["## Merged models", "", _markdown(table), ""]
    gains = []
    for base, group in test.groupby("base"):
        b = group[group.kind == "base"].set_index("task")["value"]
        mt = group[(group.kind == "multitask") & (group.combo == "all")].set_index("task")["value"]
        e = group[(group.kind == "expert") & (group.task == group.expert_task)].set_index("task")["value"]
        for task in held_in:
            gains.append({"base": base, "task": task, "base score": f"{b.get(task, np.nan):.3f}",
                          "expert": f"{e.get(task, np.nan):.3f}",
                          "expert gain": f"{e.get(task, np.nan) - b.get(task, np.nan):+.3f}",
                          "multitask": f"{mt.get(task, np.nan):.3f}"})
        for task in held_out:
            gains.append({"base": base, "task": f"{task} (held-out)",
                          "base score": f"{b.get(task, np.nan):.3f}", "expert": "-",
                          "expert gain": "-", "multitask": f"{mt.get(task, np.nan):.3f}"})
    parts += ["## Reference models (raw exact match)", "", _markdown(pd.DataFrame(gains)), ""]
    return "\n".join(parts)
