"""Figures of the study, drawn from results/tables/normalized.csv.

Every figure is written as PNG and PDF. A method keeps its colour in every figure
(colours are assigned over the sorted names of all methods in the table).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

NORMALIZED_ROWS = [("held_in_normalized", "held-in (÷ expert)"),
                   ("held_out_normalized", "held-out (÷ base)")]
VS_MULTITASK_ROWS = [("held_in_vs_multitask", "held-in (÷ multitask)"),
                     ("held_out_vs_multitask", "held-out (÷ multitask)")]


def method_colours(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, stable across figures (sorted names -> tab10/tab20)."""
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def _sizes(df: pd.DataFrame) -> list[str]:
    return list(df.sort_values("parameters")["size"].drop_duplicates())


def _save(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)


def _mean_std_line(ax, g: pd.DataFrame, column: str, **style) -> None:
    stats = g.groupby("k")[column].agg(["mean", "std"]).reset_index()
    ax.errorbar(stats.k, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, **style)


def _grid(n_cols: int, title: str):
    fig, axes = plt.subplots(2, n_cols, figsize=(4.2 * n_cols, 6.6), squeeze=False, sharex=True)
    fig.suptitle(title)
    return fig, axes


def _finish(fig, axes, out: Path) -> None:
    for ax in axes.flat:
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xlabel("experts merged (k)")
        ax.set_ylabel("normalised score")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    _save(fig, out)


def plot_normalized_vs_k(normalized: pd.DataFrame, quality: str, out: Path) -> None:
    """The paper's main figure for one base quality: normalised held-in (top) and held-out
    (bottom) vs k, one panel per size, a line per method, error bars over subsets."""
    colours = method_colours(list(normalized.method.unique()))
    data = normalized[normalized.quality == quality]
    sizes = _sizes(data)
    fig, axes = _grid(len(sizes), f"{quality} bases: normalised performance vs experts merged")
    for col, size in enumerate(sizes):
        at_size = data[data["size"] == size]
        for row, (column, label) in enumerate(NORMALIZED_ROWS):
            ax = axes[row][col]
            for method, g in at_size[~at_size.reference.astype(bool)].groupby("method"):
                _mean_std_line(ax, g, column, label=method, color=colours[method])
            for ref, style in (("multitask", "--"), ("base", ":")):
                g = at_size[at_size.method == ref]
                if len(g) and g[column].notna().any():
                    _mean_std_line(ax, g, column, label=ref, color="grey", ls=style)
            ax.set_title(f"size {size}: {label}")
    _finish(fig, axes, out)


def plot_merged_vs_multitask(normalized: pd.DataFrame, out: Path) -> None:
    """Merged / multitask of the same subset vs k; a panel per base (by size, then quality)."""
    colours = method_colours(list(normalized.method.unique()))
    merged = normalized[~normalized.reference.astype(bool)]
    bases = list(merged.sort_values(["parameters", "quality"]).base.drop_duplicates())
    fig, axes = _grid(len(bases), "merged models relative to the multitask model of the same subset")
    for col, base in enumerate(bases):
        for row, (column, label) in enumerate(VS_MULTITASK_ROWS):
            ax = axes[row][col]
            for method, g in merged[merged.base == base].groupby("method"):
                _mean_std_line(ax, g, column, label=method, color=colours[method])
            ax.set_title(f"{base}: {label}")
    _finish(fig, axes, out)


def plot_base_quality(normalized: pd.DataFrame, out: Path) -> None:
    """Base vs instruction-tuned (and short-pretrained) bases: normalised held-in (top) and
    held-out (bottom) vs k, averaged over methods; a panel per size, a line per quality."""
    merged = normalized[~normalized.reference.astype(bool)]
    sizes = _sizes(merged)
    qualities = sorted(merged.quality.unique())
    colours = {q: plt.get_cmap("Set1")(i) for i, q in enumerate(qualities)}
    fig, axes = _grid(len(sizes), "base quality: normalised performance, mean over methods")
    for col, size in enumerate(sizes):
        for row, (column, label) in enumerate(NORMALIZED_ROWS):
            ax = axes[row][col]
            for quality, g in merged[merged["size"] == size].groupby("quality"):
                _mean_std_line(ax, g, column, label=quality, color=colours[quality])
            ax.set_title(f"size {size}: {label}")
    _finish(fig, axes, out)


def plot_barrier(curves: pd.DataFrame, out: Path) -> None:
    """Loss (top) and score (bottom) against alpha, naive vs matched; a panel per pair."""
    pairs = list(dict.fromkeys(curves.pair))
    fig, axes = plt.subplots(2, len(pairs), figsize=(4.2 * len(pairs), 6.0), squeeze=False, sharex=True)
    styles = {False: ("naive", "tab:red", "o"), True: ("weight matching", "tab:blue", "s")}
    for col, pair in enumerate(pairs):
        for row, (column, label) in enumerate([("loss", "validation loss"), ("score", "exact match")]):
            ax = axes[row][col]
            for matched, g in curves[curves.pair == pair].groupby("matched"):
                name, colour, marker = styles[bool(matched)]
                g = g.sort_values("alpha")
                ax.plot(g.alpha, g[column], marker=marker, color=colour, label=name)
            ax.set_title(f"{pair}: {label}")
            ax.set_xlabel("alpha (0: model A, 1: model B)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, out)
