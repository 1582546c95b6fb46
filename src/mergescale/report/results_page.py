"""The results page of a run (docs/results.md), rendered from its tables.

    mergescale results results -o docs/results.md --figures docs/figures [--methods DIR]

reads the run's `tables/normalized.csv` and `run.json` (written by `make run` and `make
study`, see `mergescale.report.run_record`), and writes one markdown page:

    the run         date, commit, machine (cores, CPU, RAM), wall time per step, the grid
    the world       per size and base quality: base zero-shot, expert gains, task vectors,
                    the multitask reference, k = 2 best of four, checked against the tiny
                    world's thresholds (`mergescale.report.world`; reads `tables/scores.csv`)
    the claims      the five claims of Yadav et al. (2024): verdict, and per comparison the
                    estimate and interval (the findings code's JSON records)
    figures         the main figures (`mergescale.report.plots`) as small PNGs beside the page
    methods         the paper's four methods per size; every other method in a table of its
                    own (from the other-methods grid's results tree, `--methods`, when given)

`make report` runs it, so a user's own run renders the same page as the published one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mergescale.report.aggregate import markdown_table
from mergescale.report.findings import (
    N_BOOTSTRAP, PAPER_METHODS, analyse, findings_records, grid_text, read_normalized)
from mergescale.io_utils import atomic_write_text
from mergescale.report.plots import (
    merged_rows, metric_column, ordered_qualities, paper_methods, plot_base_quality,
    plot_merged_vs_multitask, plot_normalized_vs_k, plot_other_methods)
from mergescale.report.replicates import over_replicates
from mergescale.report.run_record import parse_time, read_record
from mergescale.report.world import world_lines

TABLE_METRICS = {"held_in": "held-in ÷ expert", "held_out": "held-out ÷ base",
                 "held_in_vs_multitask": "held-in ÷ multitask",
                 "held_out_vs_multitask": "held-out ÷ multitask"}


@dataclass
class Figure:
    file: Path
    title: str
    caption: str


def render_results_page(results_dir, out, figures_dir=None, methods_dir=None,
                        n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> str:
    """Write the page to `out` and its figures to `figures_dir` (default: `figures/`
    beside the page); return the markdown."""
    results_dir, out = Path(results_dir), Path(out)
    figures_dir = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    table_path = results_dir / "tables" / "normalized.csv"
    normalized = read_normalized(table_path)
    methods_table = None
    if methods_dir is not None:
        methods_table = read_normalized(Path(methods_dir) / "tables" / "normalized.csv")
    study, claims = analyse(normalized, n_bootstrap, seed)
    records = findings_records(claims)
    figures = _figures(normalized, methods_table, figures_dir)
    run = read_record(results_dir / "run.json")
    lines = [
        "# Results", "",
        "The five claims of Yadav et al. (2024), \"What Matters for Model Merging at Scale?\", "
        "tested on one run of this workflow. The page is written by `mergescale results` from "
        f"the run's tables (`{_shown(table_path)}`); `make report` writes it for any run, so "
        "`make study` then `make report` gives this page for your own run. How every claim is "
        "tested: [findings.md](findings.md).", "",
        "## The run", "", *_run_lines(run, table_path), "",
        "What the grid can and cannot test:", "", *grid_text(study), *(f"- {n}" for n in study.notes), "",
        "## The world", "", *world_lines(results_dir, normalized),
        "## The five claims", "", *_claim_lines(records, claims), "",
        "## Figures", "", *_figure_lines(figures, out, lambda f: f.file.stem != "other_methods"),
        "## Merge methods", "", *_method_lines(normalized, methods_table, methods_dir),
        *_figure_lines(figures, out, lambda f: f.file.stem == "other_methods"),
    ]
    text = "\n".join(lines).rstrip() + "\n"
    atomic_write_text(out, text)
    return text


def _shown(path: Path) -> str:
    """A path as the page shows it: relative to the working directory when under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _run_lines(run: dict | None, table_path: Path) -> list[str]:
    if run is None:
        written = pd.Timestamp(table_path.stat().st_mtime, unit="s", tz="UTC")
        return [f"- Date: tables written {written:%Y-%m-%d %H:%M} UTC.",
                "- Commit, machine, wall time: not recorded (the run has no `run.json`; "
                "`make study` writes it)."]
    start, end = parse_time(run["start"]), parse_time(run["end"])
    commit = run.get("commit") or "not recorded"
    if run.get("commit") and run.get("dirty"):
        commit += " (with uncommitted changes to tracked files)"
    m = run.get("machine", {})
    ram = f", {m['ram_gib']:g} GiB RAM" if m.get("ram_gib") else ""
    steps = "; ".join(f"{s['name']} {_duration(s['seconds'])}" for s in run.get("steps", []))
    until = f"{end:%H:%M}" if end.date() == start.date() else f"{end:%Y-%m-%d %H:%M}"
    return [
        f"- Date: {start:%Y-%m-%d}, {start:%H:%M} to {until} UTC.",
        f"- Commit: `{commit}`." if run.get("commit") else "- Commit: not recorded.",
        f"- Machine: {m.get('cores', '?')} cores, {m.get('cpu', 'unknown CPU')}{ram}"
        + (f", {m['system']}" if m.get("system") else "") + ".",
        f"- Wall time: {_duration(run['wall_seconds'])}" + (f" ({steps})." if steps else "."),
    ] + ([f"- Config: `{run['config']}`."] if run.get("config") else [])


def _number(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:+.3f}"


def _claim_lines(records: list[dict], claims) -> list[str]:
    heads = {r["claim"]: r for r in records if r["comparison"] == "claim"}
    lines = [markdown_table(pd.DataFrame([
        {"claim": f"{c.number}. {c.title}", "verdict": f"**{heads[c.number]['verdict']}**",
         "why": heads[c.number]["summary"]} for c in claims])), "",
        "Per claim, each comparison's estimate and interval (intervals at the level of the "
        "comparison's Holm step; 'descriptive' rows show detail and do not enter the verdict; "
        "with fewer than 3 replicates per cell an interval only shows the spread over expert "
        "subsets).", ""]
    for c in claims:
        rows = [r for r in records if r["claim"] == c.number and r["comparison"] != "claim"]
        lines += [f"### {c.number}. {c.title}", "",
                  f"**{heads[c.number]['verdict'].capitalize()}.** {heads[c.number]['summary']}", ""]
        if rows:
            lines += [markdown_table(pd.DataFrame([{
                "comparison": r["comparison"], "estimate": _number(r["estimate"]),
                "interval": (f"[{_number(r['low'])}, {_number(r['high'])}]"
                             if r["low"] is not None else "-"),
                "replicates": r["replicates"],
                "verdict": r["verdict"] + (f" ({r['note']})" if r.get("note") else "")}
                for r in rows])), ""]
        lines += [f"- {n}" for n in c.notes] + ([""] if c.notes else [])
    return lines


def _figures(normalized: pd.DataFrame, methods_table: pd.DataFrame | None, figures_dir: Path
             ) -> list[Figure]:
    """Render the page's figures (small PNGs); a stale figure of an earlier page is removed."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("normalized_vs_k_*.png"):
        old.unlink()
    figures = []
    four = ", ".join(paper_methods(normalized))
    for quality in ordered_qualities(normalized):
        file = figures_dir / f"normalized_vs_k_{quality}.png"
        note = plot_normalized_vs_k(normalized, quality, file, small=True)
        figures.append(Figure(file, f"Merging {quality} bases", (
            f"Normalised held-in (merged ÷ each task's expert) and held-out (merged ÷ base) "
            f"score against the number of merged experts k, {quality} bases, a panel per "
            f"size and a line per method ({four}); ratios of sums over tasks. The multitask "
            f"reference (dashed) and the base (dotted) are shown for comparison. {_sentence(note)}")))
    file = figures_dir / "base_quality.png"
    note = plot_base_quality(normalized, file, small=True)
    figures.append(Figure(file, "Base quality", (
        f"The base qualities side by side (light to dark: {', '.join(ordered_qualities(normalized))}): "
        f"normalised held-in and held-out score per k, mean over {four}, a panel per size. "
        f"{_sentence(note)}")))
    file = figures_dir / "merged_vs_multitask.png"
    note = plot_merged_vs_multitask(normalized, file, small=True)
    figures.append(Figure(file, "Merged vs multitask", (
        "Merged models ÷ the multitask reference, scored on the subset's tasks (1: as good as "
        "multitask training), ratio of sums over the tasks where the multitask model is above "
        f"chance; a panel per size, a line per method, each replicate averaged over base qualities. {_sentence(note)}")))
    others = methods_table if methods_table is not None else normalized
    other_path = figures_dir / "other_methods.png"
    if set(merged_rows(others).method) - set(PAPER_METHODS):
        note = plot_other_methods(others, other_path, small=True)
        figures.append(Figure(other_path, "Every merge method", (
            "Every merge method, sorted by mean held-in score (best at the top): normalised "
            "held-in and held-out score, a marker per k; the paper's four in their colours, the "
            f"others in grey. {_sentence(note)}")))
    elif other_path.exists():
        other_path.unlink()
    return figures


def _sentence(note: str) -> str:
    return note[0].upper() + note[1:] + "."


def _figure_lines(figures: list[Figure], out: Path, keep) -> list[str]:
    lines = []
    for f in figures:
        if keep(f):
            link = Path(os.path.relpath(f.file, out.parent)).as_posix()
            lines += [f"![{f.title}]({link})", "", f"*{f.title}.* {f.caption}", ""]
    return lines


def _cell(s: pd.Series) -> str:
    if pd.isna(s["mean"]):
        return "n/a"
    if pd.isna(s["low"]):
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def method_table(normalized: pd.DataFrame, methods: list[str], ks: list | None = None) -> pd.DataFrame:
    """Per size and method: each normalised score as the mean over base replicates (each
    replicate averaged over qualities, k and subsets) with its 95% t interval, the
    replicates, and the mean merge time. Rows by size, then best held-in first."""
    qualities = ordered_qualities(normalized)
    rows = merged_rows(normalized)
    rows = rows[rows.method.isin(methods) & rows.quality.fillna("").astype(str).isin(qualities)]
    if ks is not None:
        rows = rows[rows.k.isin(ks)]
    keys = ["size", "method"]
    table = rows.groupby(keys, sort=False).agg(parameters=("parameters", "first"),
                                               ks=("k", lambda k: sorted(set(k)))).reset_index()
    for metric, label in TABLE_METRICS.items():
        summary = over_replicates(rows, metric_column(rows, metric), keys)
        merged = table.merge(summary, on=keys, how="left")
        table[label] = [_cell(r) for _, r in merged.iterrows()]
        if metric == "held_in":
            table["_order"], table["replicates"] = merged["mean"].to_numpy(), merged["replicates"]
    seconds = rows.groupby(keys).merge_seconds.mean() if "merge_seconds" in rows else None
    table["merge s"] = [f"{seconds[(s, m)]:.2f}" if seconds is not None and pd.notna(seconds.get((s, m)))
                        else "-" for s, m in zip(table["size"], table.method)]
    table["k"] = [", ".join(f"{k:g}" for k in ks_) for ks_ in table.ks]
    table["replicates"] = table["replicates"].fillna(0).astype(int)
    table = table.sort_values(["parameters", "_order"], ascending=[True, False], kind="stable")
    return table[["size", "method", "k", *TABLE_METRICS.values(), "replicates", "merge s"]]


def _method_lines(normalized: pd.DataFrame, methods_table: pd.DataFrame | None, methods_dir
                  ) -> list[str]:
    four = [m for m in PAPER_METHODS if m in set(merged_rows(normalized).method)]
    lines = ["Normalised scores as the mean over base replicates with a 95% t interval (each "
             "replicate averaged over base qualities, k and expert subsets; no interval with one "
             "replicate), ratios of sums over tasks; merge time in seconds per merge.", "",
             "### The paper's four methods", ""]
    lines += ([markdown_table(method_table(normalized, four)), ""] if four
              else ["None of " + ", ".join(PAPER_METHODS) + " is in this run.", ""])
    source, where = ((methods_table, f"the other-methods grid (`{_shown(Path(methods_dir))}`)")
                     if methods_table is not None else (normalized, "this run"))
    present = set(merged_rows(source).method)
    others = sorted(present - set(PAPER_METHODS))
    lines += ["### Other methods", ""]
    if not others:
        return lines + ["This run merges with no other method (`make study` runs them in the "
                        "other-methods grid, `config/study-methods.yaml`).", ""]
    shown = others + [m for m in PAPER_METHODS if m in present]
    ks = sorted(set.intersection(*(set(merged_rows(source)[merged_rows(source).method == m].k)
                                   for m in shown)))
    lines += [f"From {where}; the paper's four methods are listed too, for comparison"
              + (f"; only k = {', '.join(f'{k:g}' for k in ks)}, the values of k every method "
                 "was run at." if ks else "; the methods ran at different k (column k)."), "",
              markdown_table(method_table(source, shown, ks or None).assign(method=lambda t: [
                  f"{m} (paper's four)" if m in PAPER_METHODS else m for m in t.method])), ""]
    return lines
