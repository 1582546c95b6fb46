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


def _save(fig, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)
