"""The five claims of "What Matters for Model Merging at Scale?" tested on normalized.csv.

Each claim is a small set of comparisons on the study cube (see `mergescale.report.inference`:
the unit is a base checkpoint, size + quality + replicate); one verdict per claim among
supported / refuted / no meaningful difference / inconclusive. docs/findings.md states
every rule, threshold and column. Nothing here is written in advance: every sentence is
filled from the numbers.

    1. strong bases merge better: per size, the stronger quality label minus the weaker
       (QUALITY_ORDER), held-in and held-out, with the measured zero-shot order checked;
    2. larger models merge more easily: slope over log parameters, per k, held-in and out;
    3. merging improves held-out generalisation: merged vs base at every size, and merged
       vs multitask at the largest k and size;
    4. larger models merge more experts: slope over k, its trend over log parameters;
    5. methods behave alike at scale: between-method variance of the paper's four methods
       minus its noise variance, per size, and its trend over log parameters.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mergescale.report.aggregate import markdown_table
from mergescale.report.inference import (
    ALPHA, MIN_REPLICATES, N_BOOTSTRAP, ROPE, ClaimResult, Comparison, Draws, claim_verdict,
    decide, draw_weights, slope, weighted_cell_means)

# Base-quality labels from weaker to stronger (claim 1 compares neighbours by label).
# Other labels (e.g. `lora`, the same weights as `pretrained`) enter no strength comparison.
QUALITY_ORDER = ("short", "pretrained", "instruct")
# The paper's four methods, tuned alike; claims 1-5 use them where present.
PAPER_METHODS = ("average", "task_arithmetic", "ties", "dare_ties")
# Claim metrics: ratio of sums (robust to near-zero per-task denominators), else the
# older mean-of-ratios column.
METRICS = {
    "held_in": ("held_in_ratio_of_sums", "held_in_normalized"),
    "held_out": ("held_out_ratio_of_sums", "held_out_normalized"),
    "held_out_vs_multitask": ("held_out_vs_multitask_ratio_of_sums", "held_out_vs_multitask"),
}
TITLES = {
    1: "Merging works better from stronger (instruction-tuned) base models",
    2: "Larger models merge more easily",
    3: "Merging improves held-out generalisation",
    4: "Larger models can merge more experts",
    5: "Merge methods behave alike at scale",
}


class FindingsInputError(ValueError):
    """normalized.csv missing or without the columns the claims need."""


@dataclass
class Study:
    """normalized.csv's merged rows as cubes indexed [size, quality, replicate, method, subset]."""
    table: pd.DataFrame       # merged rows
    all_rows: pd.DataFrame    # references (base zero-shot rows) included
    sizes: list
    parameters: np.ndarray
    qualities: list
    replicates: list
    methods: list
    combos: list
    ks: np.ndarray            # k of each subset
    groups: np.ndarray        # the distinct k
    onehot: np.ndarray        # [subset, group]
    index: tuple              # row positions into the cube
    draws: Draws
    notes: list
    _cubes: dict = field(default_factory=dict, repr=False)
    _means: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_table(cls, normalized: pd.DataFrame, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
                   ) -> "Study":
        merged = normalized[~normalized.reference.astype(bool)].copy()
        notes = []
        if merged.empty:
            raise FindingsInputError("normalized table has no merged rows (every row is a reference)")
        merged["replicate"] = merged.get("replicate", 0)
        merged["replicate"] = merged["replicate"].fillna(0).astype(int)
        merged["quality"] = merged.quality.fillna("").astype(str)  # an empty label reads as NaN
        by_size = merged.groupby("size", sort=False).parameters.first()
        sizes = sorted(by_size.index, key=lambda s: (np.nan_to_num(by_size[s], nan=np.inf), str(s)))
        parameters = np.array([by_size[s] for s in sizes], float)
        qualities = sorted(merged.quality.unique(),
                           key=lambda q: (QUALITY_ORDER.index(q) if q in QUALITY_ORDER else 99, q))
        replicates = sorted(merged.replicate.unique())
        methods = sorted(merged.method.unique())
        combo_k = merged.groupby("combo").k.first()
        combos = sorted(combo_k.index, key=lambda c: (combo_k[c], c))
        ks = np.array([combo_k[c] for c in combos], float)
        groups = np.unique(ks)
        onehot = (ks[:, None] == groups[None]).astype(float)
        shared = merged.groupby(["size", "quality", "replicate"]).base.nunique()
        for key, n in shared[shared > 1].items():
            notes.append(f"{n} bases share size {key[0]}, quality {key[1]}, replicate {key[2]}: "
                         "averaged as one checkpoint (give them distinct `replicate` labels).")
        index = tuple(pd.Categorical(merged[col], categories=cats).codes for col, cats in (
            ("size", sizes), ("quality", qualities), ("replicate", replicates),
            ("method", methods), ("combo", combos)))
        present = np.zeros((len(sizes), len(replicates)))
        present[index[0], index[2]] = 1
        draws = draw_weights(present, ks, n_bootstrap, seed)
        return cls(merged, normalized, sizes, parameters, qualities, replicates, methods, combos, ks, groups,
                   onehot, index, draws, notes)

    def column(self, metric: str) -> str | None:
        return next((c for c in METRICS[metric] if c in self.table.columns), None)

    def cube(self, metric: str) -> np.ndarray:
        if metric not in self._cubes:
            self._cubes[metric] = self._build_cube(metric)
        return self._cubes[metric]

    def _build_cube(self, metric: str) -> np.ndarray:
        shape = (len(self.sizes), len(self.qualities), len(self.replicates), len(self.methods),
                 len(self.combos))
        column = self.column(metric)
        total, count = np.zeros(shape), np.zeros(shape)
        if column is not None:
            values = self.table[column].to_numpy(float)
            ok = np.isfinite(values)
            where = tuple(i[ok] for i in self.index)
            np.add.at(total, where, values[ok])
            np.add.at(count, where, 1)
        with np.errstate(invalid="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def paper_methods(self) -> list[int]:
        chosen = [i for i, m in enumerate(self.methods) if m in PAPER_METHODS]
        return chosen or list(range(len(self.methods)))

    def cell_means(self, metric: str, methods: list[int]) -> np.ndarray:
        """[b, size, quality, method, k] over replicates and subsets (computed once)."""
        key = (metric, tuple(methods))
        if key not in self._means:
            self._means[key] = weighted_cell_means(self.cube(metric)[:, :, :, methods],
                                                   self.draws, self.onehot)
        return self._means[key]

    def replicate_counts(self, metric: str, methods: list[int]) -> np.ndarray:
        """[size, quality]: independent replicates with data."""
        has = np.isfinite(self.cube(metric)[:, :, :, methods]).any(axis=(3, 4))
        return has.sum(axis=2)

    def log_params(self) -> np.ndarray:
        return np.log(self.parameters)

    def common_qualities(self, counts: np.ndarray) -> list[int]:
        """Qualities with data at every size (a label at one size only is no trend's unit)."""
        return [q for q in range(len(self.qualities)) if (counts[:, q] > 0).all()]


def _mean_over(values: np.ndarray, axes: tuple, valid: np.ndarray) -> np.ndarray:
    """nanmean over `axes` of the cells valid on the data (draw 0)."""
    masked = np.where(valid, values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw with no cell left: NaN
        return np.nanmean(masked, axis=axes)


def _trend_comparison(claim, label, per_size, study, sizes, counts, direction, rope=ROPE):
    """Slope of per_size[b, size] over log parameters, times the log range (so the estimate
    is the change from the smallest to the largest size, in the metric's units)."""
    x = study.log_params()[sizes]
    est = slope(x, per_size, axis=1) * (x.max() - x.min())
    n = int(counts.min())
    return Comparison(claim, label, est, n, int((counts - 1).sum()), direction, rope)


def claim_strong_bases(study: Study) -> ClaimResult:
    """Tested: each step of QUALITY_ORDER, averaged over the sizes that have both labels
    (per-size differences alone have 2 degrees of freedom at 3 replicates: no power after
    Holm). The per-size differences are shown as descriptive rows."""
    result = ClaimResult(1, TITLES[1])
    methods = study.paper_methods()
    zero_shot = _zero_shot(study)
    for metric in ("held_in", "held_out"):
        means = study.cell_means(metric, methods)
        counts = study.replicate_counts(metric, methods)
        ordered = [q for q, name in enumerate(study.qualities) if name in QUALITY_ORDER]
        for weak, strong in zip(ordered, ordered[1:]):
            qs, qw = study.qualities[strong], study.qualities[weak]
            sizes = [s for s in range(len(study.sizes)) if counts[s, weak] and counts[s, strong]]
            if not sizes:
                continue
            per_size = []
            for s in sizes:
                diff = means[:, s, strong] - means[:, s, weak]
                per_size.append(_mean_over(diff, (1, 2), np.isfinite(diff[0])[None]))
                n = int(min(counts[s, weak], counts[s, strong]))
                result.comparisons.append(Comparison(
                    1, f"size {study.sizes[s]}, {metric}: {qs} - {qw}", per_size[-1], n, n - 1, 1,
                    ROPE, descriptive=True))
                if metric == "held_in":
                    zs, zw = zero_shot.get((study.sizes[s], qs)), zero_shot.get((study.sizes[s], qw))
                    if zs is not None and zw is not None and not zs > zw:
                        result.notes.append(
                            f"size {study.sizes[s]}: the measured zero-shot order disagrees with the "
                            f"labels ({qs} {zs:.3f} vs {qw} {zw:.3f}); the comparison is by label.")
            n_s = np.array([min(counts[s, weak], counts[s, strong]) for s in sizes])
            result.comparisons.append(Comparison(
                1, f"{metric}: {qs} - {qw}, mean over {len(sizes)} size(s)",
                np.mean(per_size, axis=0), int(n_s.min()), int((n_s - 1).sum()), 1, ROPE))
    if not result.comparisons:
        result.notes.append("Needs two qualities of " + " < ".join(QUALITY_ORDER) + " at one size.")
    return result


def _zero_shot(study: Study) -> dict:
    """{(size, quality): mean raw zero-shot score of the base rows (held-in and held-out)}."""
    bases = study.all_rows[study.all_rows.method == "base"]
    if bases.empty or not {"held_in_raw", "held_out_raw"} <= set(bases.columns):
        return {}
    score = bases[["held_in_raw", "held_out_raw"]].mean(axis=1)
    return score.groupby([bases["size"], bases["quality"]]).mean().to_dict()


def _cells_at_common_qualities(study: Study, metric: str, sizes: list[int]):
    """Claims 2 and 4 compare sizes: the paper methods' cell means of ``metric`` at those
    sizes, restricted to the qualities every size has replicates of ([b, size, quality,
    method, k]), the replicate counts ([size, quality]) and those qualities' indices."""
    methods = study.paper_methods()
    counts = study.replicate_counts(metric, methods)[sizes]
    quals = study.common_qualities(counts)
    cells = study.cell_means(metric, methods)[:, sizes][:, :, quals] if quals else None
    return cells, counts, quals


def claim_larger_merge_easier(study: Study) -> ClaimResult:
    result = ClaimResult(2, TITLES[2])
    sizes = [s for s in range(len(study.sizes)) if np.isfinite(study.parameters[s])]
    if len(sizes) < 2:
        result.notes.append("Needs at least two sizes with known parameter counts.")
        return result
    for metric in ("held_in", "held_out"):
        cells_by_k, counts, quals = _cells_at_common_qualities(study, metric, sizes)
        if not quals:
            continue
        for g, k in enumerate(study.groups):
            cells = cells_by_k[..., g]  # [b, size, quality, method]
            per_size = _mean_over(cells, (2, 3), np.isfinite(cells[0])[None])
            result.comparisons.append(_trend_comparison(
                2, f"k={k:g}, {metric}: change from the smallest to the largest size",
                per_size, study, sizes, counts[:, quals].min(axis=1), 1))
    return result


def claim_held_out(study: Study) -> ClaimResult:
    result = ClaimResult(3, TITLES[3])
    methods = study.paper_methods()
    means = study.cell_means("held_out", methods)
    counts = study.replicate_counts("held_out", methods)
    for s, size in enumerate(study.sizes):
        quals = [q for q in range(len(study.qualities)) if counts[s, q] > 0]
        if not quals:
            continue
        cells = means[:, s, quals]
        est = _mean_over(cells, (1, 2, 3), np.isfinite(cells[0])[None]) - 1
        n = int(counts[s, quals].min())
        result.comparisons.append(Comparison(
            3, f"size {size}: held-out merged / base - 1", est, n, n - 1, 1, ROPE))
    if study.column("held_out_vs_multitask") is None:
        result.notes.append("No vs-multitask column: the comparison with the multitask model is not made.")
        return result
    s = int(np.nanargmax(np.nan_to_num(study.parameters, nan=-np.inf)))
    mt = study.cell_means("held_out_vs_multitask", methods)[:, s, :, :, -1]  # largest k
    mt_counts = study.replicate_counts("held_out_vs_multitask", methods)[s]
    quals = [q for q in range(len(study.qualities)) if mt_counts[q] > 0]
    if quals:
        cells = mt[:, quals]
        est = _mean_over(cells, (1, 2), np.isfinite(cells[0])[None]) - 1
        n = int(mt_counts[quals].min())
        result.comparisons.append(Comparison(
            3, f"size {study.sizes[s]}, k={study.groups[-1]:g}: held-out merged / multitask - 1",
            est, n, n - 1, 1, ROPE))
    else:
        result.notes.append("No multitask model above chance on a held-out task at the largest "
                            "size and k: merged vs multitask is not defined there.")
    return result


def claim_more_experts(study: Study) -> ClaimResult:
    result = ClaimResult(4, TITLES[4])
    sizes = [s for s in range(len(study.sizes)) if np.isfinite(study.parameters[s])]
    if len(sizes) < 2 or len(study.groups) < 2:
        result.notes.append("Needs at least two sizes and two values of k.")
        return result
    span = study.groups.max() - study.groups.min()
    for metric in ("held_in", "held_out"):
        cells, counts, quals = _cells_at_common_qualities(study, metric, sizes)
        if not quals:
            continue
        # cells: [b, size, quality, method, k]
        per_k = _mean_over(cells, (2, 3), np.isfinite(cells[0])[None])  # [b, size, k]
        if not np.isfinite(per_k[0]).all():
            result.notes.append(f"{metric}: not every size has every k; the slope over k is not compared.")
            continue
        k_slope = slope(study.groups, per_k, axis=2) * span  # change from the smallest to the largest k
        result.comparisons.append(_trend_comparison(
            4, f"{metric}: change over k ({study.groups.min():g} to {study.groups.max():g}), "
               "largest minus smallest size (fitted on log parameters)",
            k_slope, study, sizes, counts[:, quals].min(axis=1), 1))
    return result


def method_variance(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Between-method variance of method means minus its noise variance.

    y[unit, method] (complete rows), w[b, unit] resampling counts -> [b]. Two-way
    additive model (unit + method): the noise variance of a method mean is the residual
    mean square over the (weighted) number of units, so identical methods give 0 on average
    whatever the noise level."""
    n = w.sum(axis=1)                                   # [b]
    means = (w @ y) / n[:, None]                        # [b, method]
    m = y.shape[1]
    between = means.var(axis=1, ddof=1)
    within_unit = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)  # [unit]
    ss_resid = w @ within_unit - n * ((means - means.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    ms_resid = ss_resid / ((n - 1) * (m - 1))
    return between - ms_resid / n


def claim_methods_alike(study: Study) -> ClaimResult:
    result = ClaimResult(5, TITLES[5])
    paper = [i for i, m in enumerate(study.methods) if m in PAPER_METHODS]
    result.tables.append(("Every method, descriptive only (no test; mean over checkpoints of "
                          "each checkpoint's mean held-in score):", _method_table(study)))
    if len(paper) < 2:
        result.notes.append("Needs at least two of the paper's four methods (" + ", ".join(PAPER_METHODS) + ").")
        return result
    cube = study.cube("held_in")[:, :, :, paper]            # [size, q, r, m, c]
    counts = study.replicate_counts("held_in", paper)
    sizes = [s for s in range(len(study.sizes)) if np.isfinite(study.parameters[s])]
    quals = study.common_qualities(counts[sizes]) if sizes else []
    per_size, n_per_size, rows = [], [], []
    for s in range(len(study.sizes)):
        qs = quals if s in sizes and quals else [q for q in range(len(study.qualities)) if counts[s, q]]
        units = cube[s, qs].transpose(0, 1, 3, 2)            # [q, r, c, m]
        rep = np.broadcast_to(np.arange(units.shape[1])[None, :, None], units.shape[:3])
        sub = np.broadcast_to(np.arange(units.shape[2])[None, None, :], units.shape[:3])
        y = units.reshape(-1, len(paper))
        complete = np.isfinite(y).all(axis=1)
        y, rep, sub = y[complete], rep.reshape(-1)[complete], sub.reshape(-1)[complete]
        w = study.draws.replicates[:, s, rep] * study.draws.subsets[:, sub]
        theta = method_variance(y, w) if len(y) > 1 else np.full(len(w), np.nan)
        n = int(counts[s, qs].min()) if qs else 0
        rows.append({"size": study.sizes[s], "checkpoints per quality": n,
                     "method variance (noise removed)": f"{theta[0]:+.5f}" if np.isfinite(theta[0]) else "n/a",
                     "as a standard deviation": (f"{np.sqrt(max(theta[0], 0)):.3f}"
                                                 if np.isfinite(theta[0]) else "n/a")})
        if s in sizes:
            per_size.append(theta)
            n_per_size.append(n)
    if len(per_size) >= 2:
        result.comparisons.append(_trend_comparison(
            5, "between-method variance of " + ", ".join(study.methods[i] for i in paper)
               + " (held-in), change from the smallest to the largest size",
            np.stack(per_size, axis=1), study, sizes, np.array(n_per_size), -1, ROPE ** 2))
    else:
        result.notes.append("The trend with size needs at least two sizes.")
    result.tables.insert(0, ("Per size (the paper's four methods, held-in):", pd.DataFrame(rows)))
    return result


def _method_table(study: Study) -> pd.DataFrame:
    """Descriptive: every method's mean held-in score per size (no test)."""
    column = study.column("held_in")
    t = study.table
    per_checkpoint = t.groupby(["size", "quality", "replicate", "method"])[column].mean().reset_index()
    out = per_checkpoint.groupby(["size", "method"])[column].agg(["mean", "std", "count"]).reset_index()
    order = {s: i for i, s in enumerate(study.sizes)}
    out = out.sort_values(["size", "mean"], key=lambda c: c.map(order) if c.name == "size" else -c)
    return pd.DataFrame({
        "size": out["size"], "method": out.method,
        "paper's four": ["yes" if m in PAPER_METHODS else "" for m in out.method],
        f"mean {column}": [f"{v:.3f}" for v in out["mean"]],
        "sd over checkpoints": [f"{v:.3f}" if pd.notna(v) else "-" for v in out["std"]],
        "checkpoints": out["count"]})


def analyse(normalized: pd.DataFrame, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
            ) -> tuple[Study, list[ClaimResult]]:
    """Every claim's comparisons and verdict."""
    study = Study.from_table(normalized, n_bootstrap, seed)
    results = [claim_strong_bases(study), claim_larger_merge_easier(study), claim_held_out(study),
               claim_more_experts(study)]
    results.append(claim_methods_alike(study))
    for r in results:
        decide(r.comparisons)
        claim_verdict(r)
    return study, results


def findings_records(results: list[ClaimResult]) -> list[dict]:
    """JSON-ready: per claim, one object with comparison "claim" and the claim's verdict,
    then one per comparison (claim, comparison, estimate, low, high, verdict, ...)."""
    return [d for r in results for d in r.to_dicts()]


def findings_json(normalized: pd.DataFrame, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> str:
    _, results = analyse(normalized, n_bootstrap, seed)
    return json.dumps(findings_records(results), indent=2)


HOW = {
    1: "Per size, each base-quality label minus the next weaker one ("
       + " < ".join(QUALITY_ORDER) + "), normalised held-in (÷ expert) and held-out (÷ base) "
       "scores of merged models, mean over methods, k and subsets; positive supports the claim.",
    2: "Per k, the least-squares slope of the normalised score over log parameters, reported as "
       "the change from the smallest to the largest size; positive supports the claim.",
    3: "Held-out score of merged models ÷ the base's (ratio of sums over tasks) minus 1 at "
       "every size; and ÷ the multitask model's at the largest size and k (tasks where the "
       "multitask model is above chance only); positive supports the claim.",
    4: "Per size, the slope of the normalised score over k (as the change over the range of k); "
       "then that slope's trend over log parameters; positive (a flatter decline at scale) "
       "supports the claim.",
    5: "Per size, the variance between the paper's four methods' mean held-in scores minus the "
       "variance that noise alone gives them (two-way residual mean square ÷ units); then its "
       "trend over log parameters; negative (methods closer at scale) supports the claim. No "
       "method is picked from the data.",
}


def grid_text(study: Study) -> list[str]:
    """What this grid can and cannot test, in words."""
    counts = study.replicate_counts("held_in", list(range(len(study.methods))))
    have = counts[counts > 0]
    per_k = pd.Series(study.ks).value_counts().sort_index()
    lines = [
        f"- {len(study.sizes)} size(s) ({', '.join(f'{s} ({p:,.0f} parameters)' if np.isfinite(p) else str(s) for s, p in zip(study.sizes, study.parameters))}); "
        f"base qualities: {', '.join(str(q) or '(unlabelled)' for q in study.qualities)}; "
        f"{_span(have)} independent replicate(s) (trained bases) per size x quality; k in {{{', '.join(f'{k:g}' for k in study.groups)}}} with "
        f"{', '.join(f'{n} subset(s) at k={k:g}' for k, n in per_k.items())}; "
        f"{len(study.methods)} merge methods ({sum(m in PAPER_METHODS for m in study.methods)} of the paper's four).",
    ]
    if len(have) and have.max() < MIN_REPLICATES:
        lines.append(
            f"- No claim can get a verdict here: a verdict needs at least {MIN_REPLICATES} "
            "independently trained bases (replicates) in every compared cell, and this grid has "
            f"{int(have.max())}. The numbers below describe single checkpoints: their intervals "
            "show the spread over expert subsets of one trained base, not over bases.")
    elif len(have) and have.min() < MIN_REPLICATES:
        lines.append(f"- Cells with fewer than {MIN_REPLICATES} replicates get no verdict.")
    if len(study.sizes) < 2:
        lines.append("- Claims 2, 4 and 5 (trends with size) need at least two sizes; this grid has one.")
    if not any(sum(q in QUALITY_ORDER and counts[s, i] > 0 for i, q in enumerate(study.qualities)) >= 2
               for s in range(len(study.sizes))):
        lines.append("- Claim 1 needs two base qualities of " + " < ".join(QUALITY_ORDER)
                     + " at one size; this grid has none.")
    if len(study.groups) < 2:
        lines.append("- Claim 4 needs at least two values of k.")
    single = [f"{k:g}" for k, n in per_k.items() if n < 2]
    if single:
        lines.append(f"- At k = {', '.join(single)} there is one expert subset: subset-to-subset "
                     "variation there is not measured.")
    lines.append("- Per-example correctness (stored in every scores.json) is not used: every "
                 "comparison here is between groups of checkpoints.")
    return lines


def _span(values: np.ndarray) -> str:
    if not len(values):
        return "0"
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}-{high}"


def _comparison_table(result: ClaimResult) -> str:
    rows = []
    for c in result.comparisons:
        rows.append({
            "comparison": c.label, "estimate": f"{c.estimate:+.4f}" if np.isfinite(c.estimate) else "n/a",
            "interval": (f"[{c.low:+.4f}, {c.high:+.4f}]" if np.isfinite(c.low) else "-"),
            "p (Holm)": f"{c.p_holm:.3g}" if np.isfinite(c.p_holm) else "-",
            "replicates": c.replicates, "verdict": c.verdict + (f" ({c.note})" if c.note else "")})
    return markdown_table(pd.DataFrame(rows))


def findings_markdown(normalized: pd.DataFrame, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> str:
    return render_markdown(*analyse(normalized, n_bootstrap, seed), n_bootstrap)


def render_markdown(study: Study, results: list[ClaimResult], n_bootstrap: int = N_BOOTSTRAP) -> str:
    lines = [
        "# Findings", "",
        "The claims of Yadav et al. (2024) tested on this run. The unit of inference is a base "
        "checkpoint (size + quality + replicate). Estimates are means over the paper's four "
        "methods (" + ", ".join(PAPER_METHODS) + ", where present), k and expert subsets; "
        f"standard errors come from a hierarchical bootstrap ({n_bootstrap} draws: replicates "
        "within each size, then expert subsets within each k, all methods of a subset together), "
        "with Student's t on the replicates' degrees of freedom. Within a claim, p-values are "
        f"Holm-corrected and each interval has the level of its Holm step "
        f"({ALPHA:g} divided among the claim's comparisons). A difference inside +-{ROPE} normalised (region of practical "
        "equivalence) is 'no meaningful difference'; a cell with fewer than "
        f"{MIN_REPLICATES} replicates gets no verdict, and its interval (2.5-97.5 percentiles of the "
        "draws) only describes the spread over expert subsets of the checkpoints at hand. Rows "
        "marked 'descriptive' are shown for detail and do not enter the claim's verdict. Rules, "
        "thresholds and the calibration on simulated studies: docs/findings.md.", "",
        "## What this grid can and cannot test", "", *grid_text(study), *(f"- {n}" for n in study.notes), "",
        "## Verdicts", "",
        markdown_table(pd.DataFrame([{"claim": f"{r.number}. {r.title}", "verdict": r.verdict,
                                      "why": r.summary} for r in results])), ""]
    for r in results:
        lines += [f"## {r.number}. {r.title}", "", HOW[r.number], "",
                  f"**Verdict: {r.verdict}.** {r.summary}", ""]
        if r.comparisons:
            lines += [_comparison_table(r), ""]
        lines += [f"- {n}" for n in r.notes] + ([""] if r.notes else [])
        for caption, table in r.tables:
            if len(table):
                lines += [caption, "", markdown_table(table), ""]
    return "\n".join(lines)


REQUIRED_COLUMNS = ("base", "size", "quality", "method", "reference", "combo", "k")


def read_normalized(path) -> pd.DataFrame:
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FindingsInputError(f"{path}: no such file (normalized.csv of the aggregate rule)")
    table = pd.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise FindingsInputError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.reference.astype(bool).all():
        raise FindingsInputError(f"{path}: no merged rows (every row is a reference)")
    return table


def write_findings(normalized_csv, out=None, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
                   ) -> tuple[str, list[dict]]:
    """The `findings` rule and `mergescale findings`: read normalized.csv, write the
    markdown to `out` (if given); return the markdown and the JSON records."""
    from pathlib import Path

    from mergescale.io_utils import atomic_write_text

    study, results = analyse(read_normalized(normalized_csv), n_bootstrap, seed)
    text = render_markdown(study, results, n_bootstrap)
    if out is not None:
        atomic_write_text(Path(out), text + "\n")
    return text, findings_records(results)
