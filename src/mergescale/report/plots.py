"""Figures of the study, drawn from results/tables/normalized.csv.

The main figures follow Yadav et al. (2024): normalised held-in and held-out scores
against the number of merged experts k, a panel per model size and a line per method of
the paper's four (`plot_normalized_vs_k`); the base qualities side by side
(`plot_base_quality`); merged models relative to the multitask model of the same expert
subset (`plot_merged_vs_multitask`). Every other method has a figure of its own
(`plot_other_methods`). Scores are ratios of sums over tasks (robust to a near-zero
denominator; docs/findings.md). Intervals are over base replicates, the unit of
inference: each replicate's mean over its rows (subsets, methods, qualities averaged
as the figure says), then a 95% Student's t interval over replicates; with one replicate
per cell none is drawn, and the figure says so.

One colour-blind-safe palette (Okabe & Ito) with a fixed colour per method in every
figure. Layouts are constrained and legends sit below the panels, so nothing is clipped.
Figures are written as PNG and PDF, or as one small PNG (`small=True`, for docs/).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mergescale.report.findings import PAPER_METHODS, QUALITY_ORDER  # noqa: E402
from mergescale.report.replicates import interval_note, over_replicates  # noqa: E402

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common
# colour-vision deficiency.
OKABE_ITO = {"orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000"}
METHOD_COLOURS = {"average": OKABE_ITO["blue"], "task_arithmetic": OKABE_ITO["orange"],
                  "ties": OKABE_ITO["green"], "dare_ties": OKABE_ITO["purple"],
                  "opcm": OKABE_ITO["vermillion"]}
OTHER_METHOD_COLOUR = "#5f5f5f"  # methods beyond the paper's four share one neutral colour
REFERENCE_LINES = {"multitask": ("multitask model", {"color": "black", "ls": "--", "lw": 1.2}),
              "base": ("base (zero-shot)", {"color": "#8c8c8c", "ls": ":", "lw": 1.5})}
# Base qualities are ordinal: light to dark grey, weaker to stronger.
QUALITY_SHADES = ("#e3e3e3", "#a6a6a6", "#5a5a5a")
K_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")

# Metric -> columns to use, robust ratio of sums first (older tables: mean of ratios).
COLUMNS = {
    "held_in": ("held_in_ratio_of_sums", "held_in_normalized"),
    "held_out": ("held_out_ratio_of_sums", "held_out_normalized"),
    "held_in_vs_multitask": ("held_in_vs_multitask_ratio_of_sums", "held_in_vs_multitask"),
    "held_out_vs_multitask": ("held_out_vs_multitask_ratio_of_sums", "held_out_vs_multitask"),
}
LABELS = {"held_in": "held-in\n(merged ÷ expert)", "held_out": "held-out\n(merged ÷ base)",
          "held_in_vs_multitask": "held-in\n(merged ÷ multitask)",
          "held_out_vs_multitask": "held-out\n(merged ÷ multitask)"}
SMALL_DPI = 100      # docs/figures: readable on a page, well under 150 KB once quantised
FULL_DPI = 150


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, OTHER_METHOD_COLOUR)


def metric_column(table: pd.DataFrame, metric: str) -> str:
    """The first of the metric's columns the table has."""
    for column in COLUMNS[metric]:
        if column in table.columns:
            return column
    raise KeyError(f"normalized table has none of the columns {', '.join(COLUMNS[metric])}")


def merged_rows(normalized: pd.DataFrame) -> pd.DataFrame:
    return normalized[~normalized.reference.astype(bool)]


def paper_methods(normalized: pd.DataFrame) -> list[str]:
    """The paper's four methods present (in the paper's order); every merge method if none is."""
    present = set(merged_rows(normalized).method)
    return [m for m in PAPER_METHODS if m in present] or sorted(present)


def ordered_qualities(normalized: pd.DataFrame) -> list[str]:
    """Base-quality labels of QUALITY_ORDER present, weaker to stronger; every label if none
    is (a label outside the order, e.g. `lora`, is a variant of a base, not a quality)."""
    present = set(normalized.quality.fillna("").astype(str))
    return [q for q in QUALITY_ORDER if q in present] or sorted(present)


def sizes(normalized: pd.DataFrame) -> list[str]:
    return list(normalized.sort_values("parameters", kind="stable")["size"].drop_duplicates())


def _size_title(table: pd.DataFrame, size) -> str:
    params = table.loc[table["size"] == size, "parameters"].dropna()
    if params.empty:
        return f"size {size}"
    p = float(params.iloc[0])
    human = f"{p / 1e9:.1f}B" if p >= 1e9 else f"{p / 1e6:.2f}M" if p >= 1e6 else f"{p / 1e3:.0f}k"
    return f"size {size}" if human == str(size) else f"size {size} ({human} parameters)"


def _panels(n_rows: int, n_cols: int, width: float = 3.1, height: float = 2.3, **kw):
    # at least 7.5 inches wide: the title and the legend need it even for a single panel
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(width * n_cols + 0.8, 7.5), height * n_rows + 1.1),
                             squeeze=False, layout="constrained", **kw)
    return fig, axes


def _save(fig, out: Path, small: bool = False) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if small:
        fig.savefig(out, dpi=SMALL_DPI)
        _quantise(out)
    else:
        fig.savefig(out, dpi=FULL_DPI)
        fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)


def _quantise(png: Path) -> None:
    """A 256-colour palette PNG: a third of the size, no visible change for line art."""
    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def _legend(fig, axes, title: str | None = None, ncol: int | None = None) -> None:
    """One legend for the figure, below the panels (never over data, never cut)."""
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if labels:
        # as many columns as the figure's width holds (about 1.5 inches per entry), rows balanced
        fit = min(ncol or 4, max(2, int(fig.get_figwidth() / 1.5)), len(labels))
        rows = -(-len(labels) // fit)
        fig.legend([handles[label] for label in labels], labels, loc="outside lower center",
                   ncol=-(-len(labels) // rows), frameon=False, title=title,
                   title_fontsize="small", fontsize="small")


def _style(ax, ks: list) -> None:
    ax.axhline(1.0, color="#b0b0b0", lw=0.8, zorder=0)
    ax.set_xticks(ks)
    ax.grid(alpha=0.25)


def _draw(ax, summary: pd.DataFrame, x_offset: float, colour: str, label: str, **style) -> None:
    """Mean per k with its interval over replicates (where there is one)."""
    if summary.empty:
        return
    x = summary.k.to_numpy(float) + x_offset
    ax.plot(x, summary["mean"], marker=style.pop("marker", "o"), ms=4, color=colour, label=label,
            **style)
    has = summary["low"].notna().to_numpy()
    if has.any():
        s = summary[has]
        ax.errorbar(x[has], s["mean"], yerr=[s["mean"] - s["low"], s["high"] - s["mean"]],
                    fmt="none", ecolor=colour, elinewidth=1, capsize=2.5)


def _offsets(n: int, spread: float = 0.24) -> np.ndarray:
    """Small horizontal shifts so that the intervals of neighbouring lines do not overlap."""
    return np.linspace(-spread / 2, spread / 2, n) if n > 1 else np.zeros(1)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#808080",
            fontsize="small", wrap=True)


def _k_axes(fig, axes, ks: list, metrics: list[str]) -> None:
    for row, metric in enumerate(metrics):
        axes[row][0].set_ylabel(LABELS[metric])
        for ax in axes[row]:
            _style(ax, ks)
    for ax in axes[-1]:
        ax.set_xlabel("experts merged (k)")


def _method_lines(ax, at: pd.DataFrame, column: str, methods: list[str]) -> list[int]:
    """One line per method of `column` against k, averaged over replicates with their
    intervals, side by side; returns the replicate count of every point (for the note)."""
    counts = []
    for offset, method in zip(_offsets(len(methods)), methods):
        s = over_replicates(at[at.method == method], column, ["k"])
        counts += list(s.replicates)
        _draw(ax, s, offset, method_colour(method), method)
    return counts


def _method_panels(data: pd.DataFrame, metrics: list[str], methods: list[str], add_to_panel):
    """A row of panels per metric and a column per size, a line per method in each;
    ``add_to_panel(ax, rows_of_the_size, column)`` draws what a figure adds to every panel.
    Returns the figure, its axes and the replicate counts of the lines."""
    fig, axes = _panels(len(metrics), len(sizes(data)), sharex=True, sharey="row")
    counts = []
    for col, size in enumerate(sizes(data)):
        at = data[data["size"] == size]
        axes[0][col].set_title(_size_title(data, size), fontsize="medium")
        for row, metric in enumerate(metrics):
            ax, column = axes[row][col], metric_column(data, metric)
            counts += _method_lines(ax, at, column, methods)
            add_to_panel(ax, at, column)
    return fig, axes, counts


def plot_normalized_vs_k(normalized: pd.DataFrame, quality: str, out: Path, small: bool = False) -> str:
    """The paper's main figure for one base quality: normalised held-in (top) and held-out
    (bottom) vs k, a panel per size, a line per method of the paper's four, intervals over
    base replicates; the multitask model and the base as references. Returns the interval note."""
    data = normalized[normalized.quality.fillna("").astype(str) == str(quality)]
    methods = paper_methods(data)
    ks = sorted(merged_rows(data).k.unique())
    metrics = ["held_in", "held_out"]

    def references(ax, at, column):
        for ref, (label, style) in REFERENCE_LINES.items():
            s = over_replicates(at[at.method == ref], column, ["k"])
            if len(s):
                ax.plot(s.k, s["mean"], label=label, **style)

    fig, axes, counts = _method_panels(data, metrics, methods, references)
    _k_axes(fig, axes, ks, metrics)
    note = interval_note(counts)
    fig.suptitle(f"Merging {quality} bases: normalised score against experts merged")
    _legend(fig, axes, title=note, ncol=len(methods) + len(REFERENCE_LINES))
    _save(fig, out, small)
    return note


def plot_merged_vs_multitask(normalized: pd.DataFrame, out: Path, small: bool = False) -> str:
    """Merged ÷ the multitask reference on the subset's tasks (1 = as good as multitask training),
    held-in (top) and held-out (bottom) vs k, a panel per size, a line per method of the
    paper's four; each replicate averaged over the base qualities. Ratio of sums over the
    tasks where the multitask model is above chance. Returns the interval note."""
    qualities = ordered_qualities(normalized)
    data = merged_rows(normalized)
    data = data[data.quality.fillna("").astype(str).isin(qualities)]
    methods = paper_methods(data)
    metrics = ["held_in_vs_multitask", "held_out_vs_multitask"]

    def undefined_where_empty(ax, at, column):
        if not at[column].notna().any():
            _no_data(ax, "undefined: the multitask model\nis at chance on every task")

    fig, axes, counts = _method_panels(data, metrics, methods, undefined_where_empty)
    _k_axes(fig, axes, sorted(data.k.unique()), metrics)
    for ax in axes.flat:  # the reference line is the multitask model itself
        ax.axhline(1.0, label="multitask model", **REFERENCE_LINES["multitask"][1])
    note = interval_note(counts)
    fig.suptitle("Merged models relative to the multitask model (on the subset's tasks)"
                 + (f"\n(mean over base qualities: {', '.join(qualities)})" if len(qualities) > 1 else ""))
    _legend(fig, axes, title=note, ncol=len(methods) + 1)
    _save(fig, out, small)
    return note


def plot_base_quality(normalized: pd.DataFrame, out: Path, small: bool = False) -> str:
    """The base qualities side by side: normalised held-in (top) and held-out (bottom) per k,
    mean over the paper's four methods, a bar per quality (weaker to stronger, light to
    dark), a panel per size, intervals over base replicates. Returns the interval note."""
    qualities = ordered_qualities(normalized)
    data = merged_rows(normalized)
    data = data[data.method.isin(paper_methods(data))
                & data.quality.fillna("").astype(str).isin(qualities)]
    ks = sorted(data.k.unique())
    metrics = ["held_in", "held_out"]
    shades = (QUALITY_SHADES if len(qualities) <= len(QUALITY_SHADES)
              else plt.get_cmap("Greys")(np.linspace(0.25, 0.9, len(qualities))))
    width = min(0.8 / len(qualities), 0.3)
    fig, axes = _panels(2, len(sizes(data)), sharex=True, sharey="row")
    counts = []
    for col, size in enumerate(sizes(data)):
        at = data[data["size"] == size]
        axes[0][col].set_title(_size_title(data, size), fontsize="medium")
        for row, metric in enumerate(metrics):
            ax, column = axes[row][col], metric_column(data, metric)
            for i, quality in enumerate(qualities):
                s = over_replicates(at[at.quality.astype(str) == quality], column, ["k"])
                if s.empty:  # this quality has no merge of the paper's methods at this size
                    continue
                counts += list(s.replicates)
                x = np.array([ks.index(k) for k in s.k]) + (i - (len(qualities) - 1) / 2) * width
                err = np.vstack([s["mean"] - s["low"], s["high"] - s["mean"]])
                ax.bar(x, s["mean"], width * 0.95, color=shades[i], edgecolor="black", lw=0.5,
                       label=quality, yerr=None if np.isnan(err).all() else np.nan_to_num(err),
                       error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "black"})
    for row, metric in enumerate(metrics):
        axes[row][0].set_ylabel(LABELS[metric])
        for ax in axes[row]:
            _style(ax, list(range(len(ks))))
            ax.set_xticklabels([f"{k:g}" for k in ks])
    for ax in axes[-1]:
        ax.set_xlabel("experts merged (k)")
    note = interval_note(counts)
    fig.suptitle("Base quality: normalised score of merged models\n(mean over "
                 + ", ".join(paper_methods(data)) + ")")
    _legend(fig, axes, title=note, ncol=len(qualities))
    _save(fig, out, small)
    return note


def plot_other_methods(normalized: pd.DataFrame, out: Path, small: bool = False) -> str:
    """Every merge method, one row each, sorted by mean held-in score: normalised held-in
    and held-out per size, a marker per k with its interval over replicates (each
    replicate averaged over the base qualities). The paper's four keep their colours;
    the other methods share one. Returns the interval note."""
    qualities = ordered_qualities(normalized)
    data = merged_rows(normalized)
    data = data[data.quality.fillna("").astype(str).isin(qualities)]
    metrics = ["held_in", "held_out"]
    order = (data.groupby("method")[metric_column(data, "held_in")].mean()
             .sort_values(ascending=True, na_position="first"))
    methods = list(order.index)  # best at the top
    ks = sorted(data.k.unique())
    at_sizes = sizes(data)
    fig, axes = _panels(1, 2 * len(at_sizes), width=2.6, height=0.24 * len(methods) + 0.9, sharey=True)
    counts = []
    dy = _offsets(len(ks), spread=0.5)
    for col, (size, metric) in enumerate((s, m) for s in at_sizes for m in metrics):
        ax, column = axes[0][col], metric_column(data, metric)
        at = data[data["size"] == size]
        for i, k in enumerate(ks):
            s = over_replicates(at[at.k == k], column, ["method"]).set_index("method")
            s = s.reindex(methods).dropna(subset=["mean"])
            counts += list(s.replicates)
            y = np.array([methods.index(m) for m in s.index]) + dy[i]
            colours = [method_colour(m) for m in s.index]
            has = s["low"].notna().to_numpy()
            ax.hlines(y[has], s["low"][has], s["high"][has], colors=np.array(colours)[has], lw=1)
            ax.scatter(s["mean"], y, c=colours, marker=K_MARKERS[i % len(K_MARKERS)], s=18,
                       zorder=3, edgecolors="none")
            ax.scatter([], [], c="black", marker=K_MARKERS[i % len(K_MARKERS)], s=18, label=f"k = {k:g}")
        ax.axvline(1.0, color="#b0b0b0", lw=0.8, zorder=0)
        ax.grid(alpha=0.25)
        ax.set_title(f"{_size_title(data, size)}\n{LABELS[metric].replace(chr(10), ' ')}",
                     fontsize="small")
        ax.set_xlabel("normalised score", fontsize="small")
    axes[0][0].set_yticks(range(len(methods)), methods, fontsize="small")
    axes[0][0].set_ylim(-0.7, len(methods) - 0.3)
    for label in axes[0][0].get_yticklabels():
        label.set_color(method_colour(label.get_text()) if label.get_text() in METHOD_COLOURS
                        else "black")
    note = interval_note(counts)
    fig.suptitle("Every merge method" + (f" (mean over base qualities: {', '.join(qualities)})"
                                         if len(qualities) > 1 else ""))
    _legend(fig, axes, title=note, ncol=len(ks))
    _save(fig, out, small)
    return note


def plot_barrier(curves: pd.DataFrame, out: Path) -> None:
    """Loss (top) and score (bottom) against alpha, naive vs matched; a panel per pair."""
    pairs = list(dict.fromkeys(curves.pair))
    fig, axes = plt.subplots(2, len(pairs), figsize=(4.2 * len(pairs), 6.0), squeeze=False, sharex=True)
    styles = {False: ("naive", OKABE_ITO["vermillion"], "o"), True: ("weight matching", OKABE_ITO["blue"], "s")}
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
        for method in (m for m in CONTINUAL_STYLE if m in set(g.method)):
            label, ls = CONTINUAL_STYLE[method]
            stats = g[g.method == method].groupby("step").held_in_normalized.agg(["mean", "min", "max"])
            colour = method_colour(method)
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
            ax.plot(wide["probe"]["measured"][a], wide["probe"]["measured"][b], "o", color=OKABE_ITO["blue"],
                    alpha=0.6, label="probes (measured)")
            sel = wide["selected"]
            for p in sel.index:
                ax.annotate("", xy=(sel["measured"][a][p], sel["measured"][b][p]),
                            xytext=(sel["predicted"][a][p], sel["predicted"][b][p]),
                            arrowprops={"arrowstyle": "->", "color": OKABE_ITO["vermillion"], "lw": 0.8})
            ax.plot(sel["predicted"][a], sel["predicted"][b], "s", mfc="none", color=OKABE_ITO["vermillion"],
                    label="chosen (predicted)")
            ax.plot(sel["measured"][a], sel["measured"][b], "s", color=OKABE_ITO["vermillion"], label="chosen (measured)")
            ax.set_xlabel(f"{a} (validation)")
            ax.set_ylabel(f"{b} (validation)")
        else:
            for kind, marker, colour in (("probe", "o", OKABE_ITO["blue"]),
                                         ("selected", "s", OKABE_ITO["vermillion"])):
                w = wide[kind]
                ax.plot(w["predicted"].mean(axis=1), w["measured"].mean(axis=1), marker, ls="none",
                        color=colour, label=f"{kind} (mean over {len(tasks)} tasks)")
            ax.plot([0, 1], [0, 1], color="black", lw=0.5)
            ax.set_xlabel("predicted mean (validation)")
            ax.set_ylabel("measured mean (validation)")
        ax.set_title(f"{base}: {setting} {combo}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out)
