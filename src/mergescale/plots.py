"""Figures of the study, drawn from results/tables/normalized.csv."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def method_colours(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, stable across figures (sorted names -> tab10/tab20)."""
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def plot_normalized_vs_k(normalized: pd.DataFrame, out: Path) -> None:
    """Normalised held-in (top) and held-out (bottom) score vs k; a panel per base."""
    merged = normalized[normalized.method != "multitask"]
    bases = sorted(normalized.base.unique())
    colours = method_colours(list(merged.method.unique()))
    fig, axes = plt.subplots(2, len(bases), figsize=(4.2 * len(bases), 6.4), squeeze=False,
                             sharex=True)
    rows = [("held_in_normalized", "held-in (÷ expert)"), ("held_out_normalized", "held-out (÷ base)")]
    for col, base in enumerate(bases):
        for row, (column, label) in enumerate(rows):
            ax = axes[row][col]
            for method, g in merged[merged.base == base].groupby("method"):
                stats = g.groupby("k")[column].agg(["mean", "std"]).reset_index()
                ax.errorbar(stats.k, stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                            capsize=3, label=method, color=colours[method])
            mt = normalized[(normalized.base == base) & (normalized.method == "multitask")]
            if len(mt) and pd.notna(mt[column]).any():
                ax.axhline(mt[column].mean(), color="grey", ls="--", lw=1, label="multitask")
            ax.axhline(1.0, color="black", lw=0.5)
            ax.set_title(f"{base}: {label}")
            ax.set_xlabel("experts merged (k)")
            ax.set_ylabel("normalised score")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)
