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
    out = Path(out)
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


CONTINUAL_STYLE = {"opcm": ("OPCM", "-"), "average": ("sequential average", "--"),
                   "task_arithmetic": ("task arithmetic", ":")}


def plot_continual(normalized: pd.DataFrame, out: Path) -> None:
    """Normalised held-in score of the tasks merged so far vs experts merged so far,
    mean over arrival orders (and subsets of the largest k) with min-max band; a panel
    per (base, setting)."""
    panels = sorted(normalized.groupby(["base", "setting"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, (base, setting) in zip(axes[0], panels):
        g = normalized[(normalized.base == base) & (normalized.setting == setting)]
        g = g[g.k == g.k.max()]  # the longest curves: every step has the same subsets
        for i, method in enumerate(m for m in CONTINUAL_STYLE if m in set(g.method)):
            label, ls = CONTINUAL_STYLE[method]
            stats = g[g.method == method].groupby("step").held_in_normalized.agg(["mean", "min", "max"])
            colour = plt.get_cmap("tab10")(i)
            ax.plot(stats.index, stats["mean"], ls, marker="o", color=colour, label=label)
            ax.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.15)
        n_curves = g[["combo", "order"]].drop_duplicates().shape[0]
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_title(f"{base}: {setting} (k={g.k.max()}, {n_curves} orders)")
        ax.set_xlabel("experts merged so far")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel("held-in so far (÷ expert)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def plot_map_front(front: pd.DataFrame, out: Path) -> None:
    """MAP per (base, setting, combo): for two experts, the two tasks' scores (probes
    measured, front predicted, chosen front points predicted -> measured); for more, the
    mean score predicted vs measured."""
    panels = sorted(front.groupby(["base", "setting", "combo"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (base, setting, combo) in zip(axes[0], panels):
        g = front[(front.base == base) & (front.setting == setting) & (front.combo == combo)]
        tasks = list(dict.fromkeys(g.task))
        wide = {kind: g[g.kind == kind].pivot(index="point", columns="task", values=["predicted", "measured"])
                for kind in ("probe", "front", "selected")}
        if len(tasks) == 2:
            a, b = tasks
            f = wide["front"]["predicted"].sort_values(a)
            ax.plot(f[a], f[b], "-", color="grey", label="front (predicted)")
            ax.plot(wide["probe"]["measured"][a], wide["probe"]["measured"][b], "o", color="tab:blue",
                    alpha=0.6, label="probes (measured)")
            sel = wide["selected"]
            for p in sel.index:
                ax.annotate("", xy=(sel["measured"][a][p], sel["measured"][b][p]),
                            xytext=(sel["predicted"][a][p], sel["predicted"][b][p]),
                            arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 0.8})
            ax.plot(sel["predicted"][a], sel["predicted"][b], "s", mfc="none", color="tab:red",
                    label="chosen (predicted)")
            ax.plot(sel["measured"][a], sel["measured"][b], "s", color="tab:red", label="chosen (measured)")
            ax.set_xlabel(f"{a} (validation)")
            ax.set_ylabel(f"{b} (validation)")
        else:
            for kind, marker in (("probe", "o"), ("selected", "s")):
                w = wide[kind]
                ax.plot(w["predicted"].mean(axis=1), w["measured"].mean(axis=1), marker, ls="none",
                        label=f"{kind} (mean over {len(tasks)} tasks)")
            ax.plot([0, 1], [0, 1], color="black", lw=0.5)
            ax.set_xlabel("predicted mean (validation)")
            ax.set_ylabel("measured mean (validation)")
        ax.set_title(f"{base}: {setting} {combo}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out)
