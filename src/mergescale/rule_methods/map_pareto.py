"""MAP: amortised Pareto fronts of task-arithmetic merges (Li et al., 2024,
"MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation", https://arxiv.org/abs/2406.07529).

A merge theta(c) = base + sum_i c_i tau_i has one coefficient per expert. MAP
    1. evaluates a few probe merges c^(1..n) (a seeded Latin hypercube in [0, c_max]^k)
       on each task's validation split,
    2. fits, per task t, a quadratic m_t(c) = a + b^T c + c^T A c by least squares,
    3. computes the Pareto front of (m_1(c), ..., m_k(c)) over a grid (k <= 3) or a
       seeded sample of coefficient space (predictions clipped to the metric's [0, 1]),
    4. materialises and evaluates a few points spread along the front; the point with the
       best predicted mean is the method's model.
The paper fits through a sigmoid with a non-linear solver and searches the front with
NSGA-III; here the fit is linear least squares (exact for a quadratic, no start values)
and the front is exhaustive over the grid or sample, which is cheap at these k.
A full quadratic has (k+1)(k+2)/2 coefficients; above ``full_quadratic_max_k`` experts
the cross terms are dropped (1 + 2k coefficients) so the probe count stays small.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from mergescale.evaluate.harness import Candidate
from mergescale.merge.checkpoint import Checkpoint
from mergescale.merge.registry import Hyperparameter
from mergescale.rule_methods.registry import RuleJob, register_rule_method
from mergescale.merge.in_memory import read_float

PAPER = "https://arxiv.org/abs/2406.07529"
DESCRIPTION = ("MAP: quadratic surrogates of each task's validation score over per-expert "
               "task-arithmetic coefficients, and the Pareto front they predict.")
HYPERPARAMETERS = (
    Hyperparameter("extra_probes", "int", 2,
                   "Probe merges beyond the quadratic's coefficient count (the minimum for an exact fit).",
                   low=0),
    Hyperparameter("full_quadratic_max_k", "int", 3,
                   "Fit all pairwise products up to this many experts; squares only above.", low=1),
    Hyperparameter("max_coefficient", "float", 1.0, "Upper end of each expert's coefficient range [0, c_max].",
                   low=0.0, low_inclusive=False),
    Hyperparameter("front_points", "int", 3, "Front points materialised and evaluated (best mean first).",
                   low=1),
    Hyperparameter("grid", "int", 21, "Grid points per coefficient when k <= 3 (a sample of grid^3 above).",
                   low=3),
)
SPLIT = "validation"


def n_features(k: int, interactions: bool) -> int:
    return (k + 1) * (k + 2) // 2 if interactions else 1 + 2 * k


def uses_interactions(k: int, full_quadratic_max_k: int) -> bool:
    return k <= full_quadratic_max_k


def n_probes(k: int, params: Mapping) -> int:
    return n_features(k, uses_interactions(k, params["full_quadratic_max_k"])) + params["extra_probes"]


def quadratic_features(c: np.ndarray, interactions: bool = True) -> np.ndarray:
    """Rows [1, c_1..c_k, c_i c_j for i <= j] (or squares only without interactions)."""
    c = np.atleast_2d(np.asarray(c, dtype=float))
    k = c.shape[1]
    pairs = itertools.combinations_with_replacement(range(k), 2) if interactions else ((i, i) for i in range(k))
    cols = [np.ones(len(c))] + [c[:, i] for i in range(k)] + [c[:, i] * c[:, j] for i, j in pairs]
    return np.stack(cols, axis=1)


def fit_quadratic(c: np.ndarray, y: np.ndarray, interactions: bool = True) -> np.ndarray:
    """Least-squares coefficients of the quadratic through (c, y); needs at least as many
    points as coefficients, in general position."""
    x = quadratic_features(c, interactions)
    if len(x) < x.shape[1]:
        raise ValueError(f"a quadratic in {c.shape[1]} coefficients has {x.shape[1]} terms; "
                         f"{len(x)} probe(s) cannot determine it")
    coef, _, rank, _ = np.linalg.lstsq(x, np.asarray(y, dtype=float), rcond=None)
    if rank < x.shape[1]:
        raise ValueError(f"probe design is degenerate (rank {rank} < {x.shape[1]} terms)")
    return coef


def predict(coef: np.ndarray, c: np.ndarray, interactions: bool = True) -> np.ndarray:
    return quadratic_features(c, interactions) @ coef


def r_squared(y: np.ndarray, fitted: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - fitted) ** 2).sum()) / ss if ss > 0 else float("nan")


def latin_hypercube(n: int, k: int, high: float, seed: int) -> np.ndarray:
    """n points in [0, high]^k, one per stratum in every coordinate (seeded)."""
    rng = np.random.default_rng(seed)
    strata = np.stack([rng.permutation(n) for _ in range(k)], axis=1)
    return (strata + rng.random((n, k))) / n * high


def search_space(k: int, high: float, grid: int, seed: int) -> np.ndarray:
    """Where the front is searched: the full grid for k <= 3, else a seeded sample of the
    same size as a 3-D grid."""
    if k <= 3:
        axis = np.linspace(0.0, high, grid)
        return np.array(list(itertools.product(axis, repeat=k)))
    return np.random.default_rng(seed).random((grid ** 3, k)) * high


def pareto_mask(y: np.ndarray) -> np.ndarray:
    """True for rows not dominated by any other (all objectives maximised).

    Points are visited by decreasing sum: a point can only be dominated by one with a
    strictly larger sum, and a dominated dominator implies a front member that also
    dominates, so comparing against the front found so far suffices."""
    y = np.asarray(y, dtype=float)
    front: list[int] = []
    for i in np.argsort(-y.sum(axis=1), kind="stable"):
        if front:
            f = y[front]
            if np.any(np.all(f >= y[i], axis=1) & np.any(f > y[i], axis=1)):
                continue
        front.append(int(i))
    mask = np.zeros(len(y), dtype=bool)
    mask[front] = True
    return mask


def select_spread(y: np.ndarray, n: int) -> list[int]:
    """Indices of n rows of y: the best mean first, then each next farthest (Euclidean,
    objective space) from those chosen, so the points spread along the front."""
    chosen = [int(np.argmax(y.mean(axis=1)))]
    while len(chosen) < min(n, len(y)):
        dist = np.min(np.linalg.norm(y[:, None, :] - y[chosen][None, :, :], axis=2), axis=1)
        if dist.max() <= 0:
            break
        chosen.append(int(np.argmax(dist)))
    return chosen


def task_arithmetic_state(base: Mapping[str, torch.Tensor], experts: Sequence[Checkpoint],
                          coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """base + sum_i c_i (theta_i - base), one tensor at a time from the expert files."""
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
            continue
        merged = b.clone()
        for ckpt, c in zip(experts, coefficients):
            merged += float(c) * (read_float(ckpt, name) - b)
        out[name] = merged
    return out


def candidates(base, experts: Sequence[Checkpoint], tasks: Sequence[str], points: np.ndarray,
               kind: str) -> Iterator[Candidate]:
    for i, c in enumerate(points):
        yield Candidate(name=f"{kind}{i}", weights=task_arithmetic_state(base, experts, c),
                        tasks=tuple((t, SPLIT) for t in tasks), meta={"kind": kind, "point": i})


class MAPFit:
    """Per-task quadratic surrogates fitted to probe scores, and the front they predict."""

    def __init__(self, tasks: Sequence[str], probes: np.ndarray, scores: np.ndarray, interactions: bool):
        self.tasks, self.interactions = list(tasks), interactions
        self.coef = [fit_quadratic(probes, scores[:, j], interactions) for j in range(len(tasks))]
        fitted = self.predict(probes, clip=False)
        self.r2 = [r_squared(scores[:, j], fitted[:, j]) for j in range(len(tasks))]

    def predict(self, c: np.ndarray, clip: bool = True) -> np.ndarray:
        y = np.stack([predict(a, c, self.interactions) for a in self.coef], axis=1)
        return np.clip(y, 0.0, 1.0) if clip else y

    def front(self, space: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Front coefficients and their predicted scores; duplicate objective vectors
        (flat regions of the clipped surrogate) are kept once."""
        y = self.predict(space)
        mask = pareto_mask(y)
        _, first = np.unique(np.round(y[mask], 12), axis=0, return_index=True)
        keep = np.sort(first)
        return space[mask][keep], y[mask][keep]


def long_rows(kind: str, points: np.ndarray, tasks: Sequence[str], predicted: np.ndarray,
              measured: np.ndarray | None = None) -> list[dict]:
    """One row per (point, task): that task's expert coefficient, predicted and measured."""
    rows = []
    for i, c in enumerate(points):
        for j, task in enumerate(tasks):
            rows.append({"kind": kind, "point": i, "task": task, "coefficient": float(c[j]),
                         "predicted": float(predicted[i, j]),
                         "measured": float(measured[i, j]) if measured is not None else math.nan})
    return rows


def _score_matrix(scored, tasks: Sequence[str]) -> np.ndarray:
    """(candidate, result) pairs -> points x tasks matrix of exact-match scores."""
    rows = []
    for _, result in scored:
        by_task = {s["task"]: s["value"] for s in result["scores"]}
        rows.append([by_task[t] for t in tasks])
    return np.array(rows, dtype=float).reshape(-1, len(tasks))


def run_map_job(base_dir, expert_dirs: Mapping[str, "Path"], out_dir, front_csv, task_dir, params: Mapping,
                labels: Mapping | None = None, dtype: str = "float32", seed: int = 0, batch_size: int = 64,
                limit: int | None = None, log=print) -> dict:
    """The workflow job: probes scored on validation (one lm-eval session for the whole
    job), quadratic fits, front, chosen front points scored; the chosen point with the
    best predicted mean -> out_dir (checkpoint + merge card); every point -> front_csv."""
    import time
    from pathlib import Path

    import pandas as pd

    from mergescale.evaluate.harness import BatchEvaluator
    from mergescale.io_utils import atomic_write_text
    from mergescale.merge.in_memory import open_checkpoints, write_merged_checkpoint
    from mergescale.rule_methods.opcm import load_base

    start = time.perf_counter()
    tasks = list(expert_dirs)
    k = len(tasks)
    checkpoints = open_checkpoints(Path(base_dir), [Path(expert_dirs[t]) for t in tasks])
    try:
        base, experts = load_base(checkpoints[0]), checkpoints[1:]
        interactions = uses_interactions(k, params["full_quadratic_max_k"])
        probes = latin_hypercube(n_probes(k, params), k, params["max_coefficient"], seed)
        evaluator = BatchEvaluator(Path(base_dir), Path(task_dir), batch_size=batch_size, limit=limit, seed=seed,
                                   log=log)
        measured = _score_matrix(evaluator.score(candidates(base, experts, tasks, probes, "probe")), tasks)
        probe_s = time.perf_counter() - start
        fit = MAPFit(tasks, probes, measured, interactions)
        log(f"{len(probes)} probes scored in {probe_s:.1f}s; quadratic fit R^2 per task: "
            + ", ".join(f"{t} {r:.3f}" for t, r in zip(tasks, fit.r2)))
        front_c, front_y = fit.front(search_space(k, params["max_coefficient"], params["grid"], seed))
        chosen = select_spread(front_y, params["front_points"])
        sel_c, sel_pred = front_c[chosen], front_y[chosen]
        sel_meas = _score_matrix(evaluator.score(candidates(base, experts, tasks, sel_c, "selected")), tasks)
        log(f"front of {len(front_c)} points; chosen mean predicted "
            + ", ".join(f"{p:.3f}" for p in sel_pred.mean(axis=1)) + " / measured "
            + ", ".join(f"{m:.3f}" for m in sel_meas.mean(axis=1)))

        rows = (long_rows("probe", probes, tasks, fit.predict(probes), measured)
                + long_rows("front", front_c, tasks, front_y)
                + long_rows("selected", sel_c, tasks, sel_pred, sel_meas))
        table = pd.DataFrame(rows)
        for i, (key, value) in enumerate((labels or {}).items()):
            table.insert(i, key, value)
        atomic_write_text(Path(front_csv), table.to_csv(index=False))

        best = sel_c[0]  # select_spread puts the best predicted mean first
        card = write_merged_checkpoint(task_arithmetic_state(base, experts, best), Path(base_dir), Path(out_dir), {
            "method": "map", "description": DESCRIPTION, "paper": PAPER, "params": dict(params),
            "base": {"path": str(Path(base_dir).resolve())},
            "experts": [{"path": str(Path(expert_dirs[t]).resolve()), "params": {"weight": float(c)}}
                        for t, c in zip(tasks, best)],
            "seed": seed, "probes": len(probes), "quadratic_terms": int(len(fit.coef[0])),
            "fit_r2": dict(zip(tasks, fit.r2)), "front_size": int(len(front_c)),
            "predicted_validation": dict(zip(tasks, map(float, sel_pred[0]))),
            "measured_validation": dict(zip(tasks, map(float, sel_meas[0]))),
            "probe_evaluation_s": round(probe_s, 2), "models_scored": evaluator.n_scored,
        }, dtype=dtype, started=start)
        log(f"map in {card['wall_time_s']:.1f}s (probes and front points scored included) -> {out_dir}")
    finally:
        for c in checkpoints:
            c.close()
    return card


def front_summary(front: "pd.DataFrame") -> "pd.DataFrame":
    """One row per (setting, base, combo): probes, fit, front size, and the chosen front
    points' validation means: the best (the method's model) and the spread among them."""
    import pandas as pd

    out = []
    for (setting, base, combo), g in front.groupby(["setting", "base", "combo"], sort=True):
        sel = g[g.kind == "selected"].groupby("point")[["predicted", "measured"]].mean()
        probes = g[g.kind == "probe"]
        fit_err = (probes.predicted - probes.measured).abs().mean()
        out.append({
            "setting": setting, "base": base, "combo": combo, "k": g.task.nunique(),
            "probes": probes.point.nunique(), "front_size": g[g.kind == "front"].point.nunique(),
            "probe_fit_mae": round(float(fit_err), 4),
            "best_predicted": round(float(sel.predicted.iloc[0]), 4),
            "best_measured": round(float(sel.measured.iloc[0]), 4),
            "front_measured_max": round(float(sel.measured.max()), 4),
            "front_measured_spread": round(float(sel.measured.max() - sel.measured.min()), 4),
            "front_abs_error": round(float((sel.predicted - sel.measured).abs().mean()), 4),
        })
    return pd.DataFrame(out)


@register_rule_method(
    name="map",
    hyperparameters=HYPERPARAMETERS,
    paper=PAPER,
    description=DESCRIPTION,
    needs=("validation_tasks",),
    own_rule=True,  # workflow/rules/methods/map.smk: its front table and figure
)
def run(job: RuleJob) -> dict:
    return run_map_job(
        base_dir=job.base, expert_dirs=dict(zip(job.tasks, job.experts)), out_dir=job.out_dir,
        front_csv=job.outputs["front"], task_dir=job.data["validation_tasks"][0].parent, params=job.params,
        labels=job.labels, dtype=job.dtype, seed=job.seed, log=job.log, **job.evaluate)
