"""Score vs sparsity of the Sparse Model Soups study: a table and a figure from
results/tables/scores.csv (soup, best copy, dense expert: test split, scored by the
evaluate rule) and the cycle cards (measured sparsity, the copies' in-job test scores,
validation losses)."""

from __future__ import annotations

import pandas as pd

from mergescale.report.aggregate import REPORT_SPLIT, markdown_table

CAPTION = (
    "Test exact match on each pruned expert's own task. Cycle c prunes the previous "
    "cycle's soup (cycle 1: the dense expert) to the target sparsity by weight magnitude, "
    "retrains the copies under that shared mask, and averages them into the soup; the best "
    "copy has the lowest validation answer loss; `copies` gives the mean (min-max) of the "
    "copies' test scores. Sparsity is measured on the prunable weight matrices (the soup's "
    "zeros). Validation losses: answer cross entropy of the pruned start model before "
    "retraining, the soup, the best copy.")


def _own_score(test: pd.DataFrame, base: str, task: str, **where) -> float:
    rows = test[(test.base == base) & (test.task == task) & (test.expert_task == task)]
    for column, value in where.items():
        rows = rows[rows[column] == value]
    if len(rows) != 1:
        raise ValueError(f"scores.csv: expected one {REPORT_SPLIT} score of {where} on {task!r} "
                         f"for base {base!r}, found {len(rows)}")
    return float(rows.value.iloc[0])


def sparse_soups_table(scores: pd.DataFrame, cards: list[tuple[str, dict]]) -> pd.DataFrame:
    """One row per (base, task, cycle) from (base name, cycle card) pairs, plus the dense
    expert as cycle 0 (sparsity 0)."""
    test = scores[scores.split == REPORT_SPLIT]
    rows = []
    for base, card in sorted(cards, key=lambda bc: (bc[0], bc[1]["task"], bc[1]["cycle"])):
        task, cycle = card["task"], card["cycle"]
        if cycle == 1:
            dense = _own_score(test, base, task, kind="expert")
            rows.append({"base": base, "task": task, "cycle": 0, "target": 0.0, "sparsity": 0.0,
                         "dense expert": dense, "soup": dense, "best copy": dense,
                         "copies mean": dense, "copies min": dense, "copies max": dense})
        model = f"sparse/{base}/{task}/c{cycle}"
        copies = [c["test"][task] for c in card["copies"] if "test" in c]
        loss = card["validation_loss"]
        nan = float("nan")
        rows.append({
            "base": base, "task": task, "cycle": cycle, "target": card["target_sparsity"],
            "sparsity": card["sparsity"]["soup"], "dense expert": nan,
            "soup": _own_score(test, base, task, model=f"{model}/soup"),
            "best copy": _own_score(test, base, task, model=f"{model}/best_copy"),
            "copies mean": sum(copies) / len(copies) if copies else nan,
            "copies min": min(copies, default=nan), "copies max": max(copies, default=nan),
            "copies": len(card["copies"]), "val loss pruned": loss["pruned"],
            "val loss soup": loss["soup"], "val loss best copy": loss["best_copy"],
        })
    table = pd.DataFrame(rows)
    dense = table[table.cycle == 0].set_index(["base", "task"])["dense expert"]
    table["dense expert"] = [dense[(b, t)] for b, t in zip(table.base, table.task)]
    return table


def table_markdown(table: pd.DataFrame) -> str:
    def f(x):
        return "-" if pd.isna(x) else f"{x:.3f}"

    rows = []
    for _, r in table.iterrows():
        sparse = r.cycle > 0
        rows.append({
            "base": r.base, "task": r.task, "cycle": int(r.cycle), "target": f(r.target),
            "sparsity": f(r.sparsity), "dense expert": f(r["dense expert"]),
            "soup": f(r.soup) if sparse else "-", "best copy": f(r["best copy"]) if sparse else "-",
            "copies mean (min-max)": (f"{f(r['copies mean'])} ({f(r['copies min'])}-{f(r['copies max'])})"
                                      if sparse else "-"),
            "soup - best copy": f"{r.soup - r['best copy']:+.3f}" if sparse else "-",
            "val loss pruned / soup / best": (f"{f(r['val loss pruned'])} / {f(r['val loss soup'])} / "
                                              f"{f(r['val loss best copy'])}" if sparse else "-"),
        })
    return "\n".join(["# Sparse Model Soups: score vs sparsity", "", CAPTION, "",
                      markdown_table(pd.DataFrame(rows)), ""])


def plot_sparse_soups(table: pd.DataFrame, out) -> None:
    """Test exact match vs measured sparsity; a panel per (base, task)."""
    from mergescale.report.plots import _save, plt

    panels = sorted(table.groupby(["base", "task"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, (base, task) in zip(axes[0], panels):
        g = table[(table.base == base) & (table.task == task)].sort_values("sparsity")
        ax.fill_between(g.sparsity, g["copies min"], g["copies max"], color="tab:grey", alpha=0.2,
                        label="copies (min-max)")
        ax.plot(g.sparsity, g["copies mean"], ":", marker=".", color="tab:grey", label="mean of copies")
        ax.plot(g.sparsity, g.soup, "-", marker="o", color="tab:blue", label="soup")
        ax.plot(g.sparsity, g["best copy"], "--", marker="s", color="tab:orange", label="best copy")
        dense = g[g.cycle == 0]["dense expert"].iloc[0]
        ax.axhline(dense, color="black", lw=0.6, label="dense expert")
        ax.set_title(f"{base}: {task}")
        ax.set_xlabel("sparsity of the prunable weights")
        ax.set_ylabel(f"exact match ({REPORT_SPLIT})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out)
