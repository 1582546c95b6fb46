"""Claim-level inference for the study: hierarchical bootstrap, Holm, equivalence, verdicts.

The unit of inference is a base checkpoint (size + quality + replicate), not a table row.
A study table becomes a dense cube per metric,

    Y[size, quality, replicate, method, subset]      (NaN where a model is missing)

and every bootstrap draw re-weights it with resampling counts:

    replicates   drawn with replacement within each size, one draw shared by the
                 qualities of that size (an instruction-tuned base is built from the
                 pretrained base of the same replicate: the pair stays paired);
    subsets      drawn with replacement within each k; the same draw serves every
                 replicate, because a subset names the same tasks on every base (the
                 subset effect is shared, so the design is crossed, not nested);
    methods      never resampled: all methods of one subset move together.

Draw 0 is the data itself (all counts 1). A statistic is any function of the weighted
cell means (or, for the method-variance claim, of the weighted units), evaluated on all
draws at once with numpy.

Intervals and tests. With three replicates a percentile interval has ten distinct
resamples and is far too narrow, so the bootstrap supplies a standard error (with
rescaled weights, see `draw_weights`) and Student's t on the replicates' degrees of
freedom supplies the quantiles. Within a claim, p-values get
Holm's step-down correction; a reported interval has the level of its comparison's Holm
step (1 - ALPHA / (m - rank), rank 0 for the smallest p), so it excludes 0 when Holm
rejects. A comparison is

    'no meaningful difference'  when its (1 - 2 ALPHA) interval lies inside +-ROPE
                                (two one-sided tests: equivalence at level ALPHA);
    'supported' / 'refuted'     when its Holm-adjusted p is below ALPHA and the estimate
                                lies outside the ROPE, on the claimed / the other side;
    'inconclusive'              otherwise, and always when a compared cell has fewer
                                than MIN_REPLICATES independent replicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
# Region of practical equivalence, in normalised-score units (2 points of a score that
# is 1.0 for the reference): differences inside it are too small to matter.
ROPE = 0.02
# Fewer independent replicates than this in a compared cell: no verdict.
MIN_REPLICATES = 3
N_BOOTSTRAP = 2000

SUPPORTED, REFUTED, EQUIVALENT, INCONCLUSIVE = (
    "supported", "refuted", "no meaningful difference", "inconclusive")
DESCRIPTIVE = "descriptive"  # a row shown for detail; the claim's verdict does not use it


@dataclass(frozen=True)
class Draws:
    """Resampling counts: replicates[b, size, replicate] and subsets[b, subset].
    Draw 0 is the data (all ones where present)."""
    replicates: np.ndarray
    subsets: np.ndarray


def draw_weights(replicate_present: np.ndarray, subset_groups: np.ndarray, n_bootstrap: int,
                 seed: int = 0) -> Draws:
    """Rescaled resampling weights for `n_bootstrap` draws plus the data itself.

    replicate_present[size, replicate]: which replicates a size has; subset_groups[subset]:
    the stratum (k) of each subset, resampled within its stratum. Counts c of a plain
    bootstrap of n units become weights 1 + sqrt(n / (n - 1)) (c - 1) (Rao & Wu 1988), so
    that the bootstrap variance of a mean is the unbiased s^2 / n at every level instead of
    (n - 1) / n of it: with 3 replicates and 3 subsets per k that bias would be a third."""
    rng = np.random.default_rng(seed)
    n_sizes, n_reps = replicate_present.shape
    reps = np.zeros((n_bootstrap + 1, n_sizes, n_reps))
    reps[0] = replicate_present
    for s in range(n_sizes):
        present = np.flatnonzero(replicate_present[s])
        if len(present):
            picks = present[rng.integers(0, len(present), (n_bootstrap, len(present)))]
            reps[1:, s] = _rescale(_counts(picks, n_reps), present)
    subsets = np.zeros((n_bootstrap + 1, len(subset_groups)))
    subsets[0] = 1
    for group in np.unique(subset_groups):
        members = np.flatnonzero(subset_groups == group)
        picks = members[rng.integers(0, len(members), (n_bootstrap, len(members)))]
        subsets[1:] += _rescale(_counts(picks, len(subset_groups)), members)
    return Draws(reps, subsets)


def _rescale(counts: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Rao-Wu weights on the `members` columns of [draws, n] counts (others stay 0)."""
    n = len(members)
    out = np.zeros_like(counts)
    factor = np.sqrt(n / (n - 1)) if n > 1 else 0.0
    out[:, members] = 1 + factor * (counts[:, members] - 1)
    return out


def _counts(picks: np.ndarray, n: int) -> np.ndarray:
    """[draws, picks] indices -> [draws, n] counts."""
    rows = np.repeat(np.arange(picks.shape[0]), picks.shape[1])
    out = np.zeros((picks.shape[0], n))
    np.add.at(out, (rows, picks.ravel()), 1)
    return out


def weighted_cell_means(cube: np.ndarray, draws: Draws, subset_onehot: np.ndarray) -> np.ndarray:
    """cube[size, quality, replicate, method, subset] -> means[b, size, quality, method, group]
    over replicates and the subsets of each group (k), weighted by the draws' weights."""
    present = ~np.isnan(cube)
    w_sub = draws.subsets[:, :, None] * subset_onehot[None]  # [b, subset, group]
    n_s, n_q, n_r, n_m, n_c = cube.shape

    def total(values: np.ndarray) -> np.ndarray:
        # subsets first, as one batched matrix product, then replicates
        by_group = np.matmul(values.reshape(-1, n_c)[None], w_sub)  # [b, s*q*r*m, group]
        by_group = by_group.reshape(len(w_sub), n_s, n_q, n_r, n_m, -1)
        return np.einsum("bsqrmg,bsr->bsqmg", by_group, draws.replicates)

    with np.errstate(invalid="ignore", divide="ignore"):
        return total(np.where(present, cube, 0.0)) / total(present.astype(float))


def slope(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Least-squares slope of y on x along `axis` (x 1-D, no NaN in y)."""
    x = np.asarray(x, float)
    shape = [1] * y.ndim
    shape[axis] = len(x)
    xc = (x - x.mean()).reshape(shape)
    yc = y - y.mean(axis=axis, keepdims=True)
    return (xc * yc).sum(axis=axis) / (xc ** 2).sum()


@dataclass
class Comparison:
    """One tested quantity of a claim; `draws[0]` is the estimate on the data."""
    claim: int
    label: str
    draws: np.ndarray
    replicates: int          # fewest independent replicates in a compared cell
    df: int                  # degrees of freedom of the replicate-level error
    direction: int = 1       # +1: a positive estimate supports the claim; -1: negative does
    rope: float = ROPE
    descriptive: bool = False  # shown with its own 95% interval, outside the claim's test
    # filled by decide()
    low: float = float("nan")
    high: float = float("nan")
    p: float = float("nan")
    p_holm: float = float("nan")
    verdict: str = INCONCLUSIVE
    note: str = ""

    @property
    def estimate(self) -> float:
        return float(self.draws[0])

    @property
    def testable(self) -> bool:
        return (not self.descriptive and self.replicates >= MIN_REPLICATES and self.df >= 1
                and np.isfinite(self.draws).all())

    @property
    def se(self) -> float:
        return float(np.std(self.draws[1:], ddof=1))

    def to_dict(self) -> dict:
        def num(x):
            return None if x is None or not np.isfinite(x) else float(x)
        return {"claim": self.claim, "comparison": self.label, "estimate": num(self.estimate),
                "low": num(self.low), "high": num(self.high), "verdict": self.verdict,
                "p_holm": num(self.p_holm), "replicates": self.replicates,
                "claimed_sign": "+" if self.direction > 0 else "-", "rope": self.rope,
                "note": self.note}


def _t_quantile(level: float, df: int) -> float:
    return float(sps.t.ppf(level, df))


def decide(comparisons: list[Comparison], alpha: float = ALPHA) -> None:
    """Holm-corrected verdicts of one claim's comparisons, in place."""
    testable = [c for c in comparisons if c.testable]
    m = max(1, len(testable))
    for c in comparisons:
        if c.descriptive:
            c.verdict = DESCRIPTIVE
            if c.replicates >= 2 and np.isfinite(c.draws).all():
                half = _t_quantile(1 - alpha / 2, c.df) * c.se
                c.low, c.high = c.estimate - half, c.estimate + half
                continue
        if not c.testable:
            finite = c.draws[np.isfinite(c.draws)]
            if len(finite) > 1 and np.isfinite(c.estimate):
                # descriptive only: the spread over resampled subsets of these checkpoints
                c.low, c.high = (float(v) for v in np.percentile(finite[1:], [2.5, 97.5]))
            c.verdict = DESCRIPTIVE if c.descriptive else INCONCLUSIVE
            n = c.replicates
            c.note = ("one checkpoint per cell" if n <= 1
                      else f"{n} checkpoints per cell, fewer than {MIN_REPLICATES}"
                      if n < MIN_REPLICATES else "undefined in some resamples (cells too sparse)")
            continue
        se, est = c.se, c.estimate
        if se > 0:
            c.p = float(2 * sps.t.sf(abs(est) / se, c.df))
        else:
            c.p = 0.0 if est != 0 else 1.0
    ranks = np.argsort(np.argsort([c.p for c in testable], kind="stable"), kind="stable")
    for c, p, rank in zip(testable, holm([c.p for c in testable]), ranks):
        c.p_holm = p
        # the interval at the level of this comparison's Holm step (1 - alpha / (m - rank)):
        # it excludes 0 exactly when Holm rejects, unless an earlier step already stopped
        half = _t_quantile(1 - alpha / (2 * (m - rank)), c.df) * c.se
        c.low, c.high = c.estimate - half, c.estimate + half
        half_tost = _t_quantile(1 - alpha, c.df) * c.se
        if -c.rope < c.estimate - half_tost and c.estimate + half_tost < c.rope:
            c.verdict = EQUIVALENT
        elif p < alpha and abs(c.estimate) > c.rope:
            c.verdict = SUPPORTED if np.sign(c.estimate) == c.direction else REFUTED
        else:
            c.verdict = INCONCLUSIVE
            if p < alpha:
                c.note = "beyond noise, but the estimate lies inside the region of practical equivalence"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    p = np.asarray(p_values, float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


@dataclass
class ClaimResult:
    number: int
    title: str
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: str = INCONCLUSIVE
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    tables: list = field(default_factory=list)   # (caption, DataFrame) shown after the comparisons

    def to_dicts(self) -> list[dict]:
        head = {"claim": self.number, "comparison": "claim", "estimate": None, "low": None,
                "high": None, "verdict": self.verdict, "summary": self.summary}
        return [head] + [c.to_dict() for c in self.comparisons]


def claim_verdict(result: ClaimResult) -> None:
    """The claim's verdict from its decided comparisons, with a sentence saying why."""
    family = [c for c in result.comparisons if not c.descriptive]
    tested = [c for c in family if c.testable]
    untested = len(family) - len(tested)
    verdicts = {c.verdict for c in tested}
    if not family:
        result.verdict, result.summary = INCONCLUSIVE, "Not testable with this grid."
    elif not tested:
        n = max(c.replicates for c in family)
        result.verdict = INCONCLUSIVE
        result.summary = (
            "Not tested: the numbers describe single checkpoints (one replicate per cell)."
            if n <= 1 else f"Not tested: at most {n} replicates per cell, fewer than {MIN_REPLICATES}.")
    elif SUPPORTED in verdicts and REFUTED in verdicts:
        result.verdict = INCONCLUSIVE
        result.summary = "Mixed: some comparisons support the claim and others refute it."
    elif SUPPORTED in verdicts or REFUTED in verdicts:
        result.verdict = SUPPORTED if SUPPORTED in verdicts else REFUTED
        n = sum(c.verdict == result.verdict for c in tested)
        result.summary = (f"{result.verdict.capitalize()} by {n} of {len(tested)} tested "
                          f"comparisons (Holm-corrected), none pointing the other way.")
    elif verdicts == {EQUIVALENT} and not untested:
        result.verdict = EQUIVALENT
        result.summary = (f"Every comparison lies within +-{family[0].rope:g} "
                          "(region of practical equivalence).")
    else:
        result.verdict = INCONCLUSIVE
        result.summary = "No comparison is beyond the noise, and not all are shown to be negligible."
    if untested and tested:
        result.summary += f" {untested} comparison(s) not tested (fewer than {MIN_REPLICATES} replicates)."
