"""Continual merging: experts arrive one at a time and are folded into one merged model.

OPCM (Tang et al., 2025, "Merging Models on the Fly Without Retraining",
https://arxiv.org/abs/2501.09522), per weight matrix, with tau_t = theta_t - theta_base:

    S_1 = tau_1
    S_t = S_{t-1} + P_{t-1}(tau_t)        P: projection away from S_{t-1}'s principal subspace
    merged_t = base + S_t * mean_{i<=t} ||tau_i|| / ||S_t||     (norms over the whole model)

P removes from tau the block U_r U_r^T tau V_r V_r^T of the leading r singular directions
of S_{t-1} (r: the index at which the cumulative singular-value mass first exceeds
alpha) and, for every other singular pair (u_i, v_i), the component u_i^T tau v_i.
Tensors that are not weight matrices (norms, embeddings) are summed unprojected. The
adaptive scale keeps the merged update's norm at the experts' mean task-vector norm,
so it neither grows like a sum nor shrinks like an average. This follows the authors'
reference implementation (fusion_bench, method/opcm), with one deliberate difference:
singular pairs with a zero singular value are arbitrary (not part of S), so only pairs
with a non-zero one are removed; for full-rank S the two agree exactly.

The state is the base plus one running update per tensor and a running sum of norms:
memory does not grow with the number of experts. Sequential averaging and task
arithmetic are the closed-form baselines with the same state (scale 1/t and lambda).
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Iterator, Mapping

import torch

from mergescale.evaluate.harness import Candidate
from mergescale.merge.checkpoint import Checkpoint
from mergescale.merge.registry import Hyperparameter
from mergescale.rule_methods.registry import RuleJob, register_rule_method
from mergescale.merge.in_memory import read_float, tensor_bytes

PAPER = "https://arxiv.org/abs/2501.09522"
DESCRIPTION = ("Continual merging by orthogonal projection (OPCM): each arriving task vector is "
               "projected away from the merged update's principal subspace, with an adaptive scale.")
HYPERPARAMETERS = (
    Hyperparameter("alpha", "float", 0.5,
                   "Singular-value mass of the merged update whose directions new experts may not use.",
                   low=0.0, high=1.0),
    Hyperparameter("orders", "int", 2, "Arrival orders evaluated after every arrival (seeded).", low=1),
    Hyperparameter("baseline_lambda", "float", 0.5,
                   "Scale of the task-arithmetic baseline curve (sum of task vectors times lambda).",
                   low=0.0, low_inclusive=False),
)


def is_projected(name: str, tensor: torch.Tensor) -> bool:
    """Weight matrices of linear layers are projected; embeddings and vectors are not."""
    return tensor.ndim == 2 and "embed" not in name


def project_away(update: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """tau minus its components in the principal subspace of ``update`` (see module doc)."""
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    total = s.sum()
    if total <= 0:
        return tau
    split = int((s.cumsum(0) / total > alpha).float().argmax())
    # singular values at round-off level belong to the null space, whose basis is arbitrary
    rank = int((s > s[0] * max(update.shape) * torch.finfo(s.dtype).eps).sum())
    ur, vr = u[:, :split], vh[:split].T
    removed = ur @ (ur.T @ tau @ vr) @ vr.T
    ud, vd = u[:, split:rank], vh[split:rank].T
    diagonal = ((ud.T @ tau) * vd.T).sum(dim=1)  # u_i^T tau v_i for each remaining pair
    removed += (ud * diagonal) @ vd.T
    return tau - removed


class SequentialMerge:
    """Base + one running update per tensor; subclasses say how a task vector joins the
    update and how the update is scaled. The base mapping is shared, never copied."""

    name = "sum"

    def __init__(self, base: Mapping[str, torch.Tensor]):
        self.base = base
        self.update: dict[str, torch.Tensor] = {}
        self.n_experts = 0

    def add_tensor(self, name: str, tau: torch.Tensor) -> None:
        if name in self.update:
            self.update[name] += tau
        else:
            self.update[name] = tau.clone()

    def finish_expert(self) -> None:
        self.n_experts += 1

    def scale(self) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.n_experts:
            raise ValueError(f"{self.name}: no expert merged yet")
        c = self.scale()
        return {n: (b + c * self.update[n]) if n in self.update else b for n, b in self.base.items()}

    def state_bytes(self) -> int:
        """Bytes of merge state beyond the shared base (constant in the number of experts)."""
        return tensor_bytes(self.update)


class SequentialAverage(SequentialMerge):
    name = "average"

    def scale(self) -> float:
        return 1.0 / self.n_experts


class SequentialTaskArithmetic(SequentialMerge):
    name = "task_arithmetic"

    def __init__(self, base, lam: float):
        super().__init__(base)
        self.lam = lam

    def scale(self) -> float:
        return self.lam


class OPCM(SequentialMerge):
    name = "opcm"

    def __init__(self, base, alpha: float = 0.5):
        super().__init__(base)
        self.alpha = alpha
        self.norm_sum = 0.0  # sum of the arrived experts' task-vector norms
        self._tau_sq = 0.0

    def add_tensor(self, name: str, tau: torch.Tensor) -> None:
        self._tau_sq += float(tau.double().square().sum())
        if name in self.update and is_projected(name, tau):
            tau = project_away(self.update[name], tau, self.alpha)
        super().add_tensor(name, tau)

    def finish_expert(self) -> None:
        super().finish_expert()
        self.norm_sum += math.sqrt(self._tau_sq)
        self._tau_sq = 0.0

    def scale(self) -> float:
        norm = math.sqrt(sum(float(u.double().square().sum()) for u in self.update.values()))
        return (self.norm_sum / self.n_experts) / norm if norm > 0 else 1.0


def load_base(base: Checkpoint) -> dict[str, torch.Tensor]:
    return {n: read_float(base, n) for n in base.names}


def add_expert(mergers: list[SequentialMerge], base: Mapping[str, torch.Tensor], expert: Checkpoint) -> None:
    """Stream one expert tensor by tensor into every merger (each tensor is read once)."""
    for name, b in base.items():
        if not b.is_floating_point():
            continue  # integer buffers are copied from the base
        tau = read_float(expert, name) - b
        for m in mergers:
            m.add_tensor(name, tau)
    for m in mergers:
        m.finish_expert()


def arrival_orders(tasks: list[str], n: int, seed: int) -> list[list[str]]:
    """Order 0 is ``tasks`` as given; the others are distinct seeded shuffles (fewer when
    the tasks have fewer permutations)."""
    orders = [list(tasks)]
    n = min(n, math.factorial(len(tasks)))
    rng = random.Random(f"opcm-orders:{seed}:{','.join(tasks)}")
    for attempt in itertools.count():
        if len(orders) >= n or attempt > 1000 * n:
            break
        order = list(tasks)
        rng.shuffle(order)
        if order not in orders:
            orders.append(order)
    return orders


def merge_in_order(base: Mapping[str, torch.Tensor], experts: Mapping[str, Checkpoint], order: list[str],
                   alpha: float) -> OPCM:
    merger = OPCM(base, alpha)
    for task in order:
        add_expert([merger], base, experts[task])
    return merger


def continual_candidates(
    base: Mapping[str, torch.Tensor], experts: Mapping[str, Checkpoint], orders: list[list[str]],
    alpha: float, baseline_lambda: float, split: str = "test",
) -> Iterator[Candidate]:
    """After each arrival, for each order: OPCM and both baselines as candidates scored on
    the tasks merged so far. Built lazily: one intermediate model in memory at a time."""
    for o, order in enumerate(orders):
        mergers = [OPCM(base, alpha), SequentialAverage(base), SequentialTaskArithmetic(base, baseline_lambda)]
        for step, task in enumerate(order, start=1):
            add_expert(mergers, base, experts[task])
            for m in mergers:
                meta = {"method": m.name, "order": o, "arrival": ">".join(order), "step": step}
                yield Candidate(name=f"{m.name}/order{o}/step{step}", weights=m.state_dict(),
                                tasks=tuple((t, split) for t in order[:step]), meta=meta)


def continual_rows(scored) -> list[dict]:
    """(candidate, result) pairs -> one row per (method, order, step, task)."""
    return [{**cand.meta, "task": s["task"], "split": s["split"], "score": s["value"], "n": s["n"]}
            for cand, result in scored for s in result["scores"]]


def run_opcm_job(base_dir, expert_dirs: Mapping[str, "Path"], out_dir, curves_csv, task_dir, params: Mapping,
                 labels: Mapping | None = None, dtype: str = "float32", seed: int = 0, batch_size: int = 64,
                 limit: int | None = None, log=print) -> dict:
    """The workflow job: OPCM of the experts in their given order -> out_dir (checkpoint +
    merge card), then every intermediate merge of OPCM and both baselines, for
    ``params['orders']`` arrival orders, scored on the test split of the tasks merged so
    far (one lm-eval session) -> curves_csv, whose first columns are ``labels``."""
    import time
    from pathlib import Path

    import pandas as pd

    from mergescale.evaluate.harness import BatchEvaluator
    from mergescale.io_utils import atomic_write_text
    from mergescale.merge.in_memory import open_checkpoints, write_merged_checkpoint

    start = time.perf_counter()
    tasks = list(expert_dirs)
    checkpoints = open_checkpoints(Path(base_dir), [Path(expert_dirs[t]) for t in tasks])
    try:
        experts = dict(zip(tasks, checkpoints[1:]))
        base = load_base(checkpoints[0])
        merger = merge_in_order(base, experts, tasks, params["alpha"])
        card = write_merged_checkpoint(merger.state_dict(), Path(base_dir), Path(out_dir), {
            "method": "opcm", "description": DESCRIPTION, "paper": PAPER, "params": dict(params),
            "base": {"path": str(Path(base_dir).resolve())},
            "experts": [{"path": str(Path(expert_dirs[t]).resolve()), "params": {"arrival": i}}
                        for i, t in enumerate(tasks)],
            "seed": seed, "merge_state_bytes": merger.state_bytes(),
        }, dtype=dtype, started=start)
        log(f"opcm of {len(tasks)} experts in {card['wall_time_s']:.2f}s, "
            f"peak RSS {card['peak_rss_bytes'] / 2**20:.0f} MiB -> {out_dir}")
        del merger

        t0 = time.perf_counter()
        orders = arrival_orders(tasks, params["orders"], seed)
        evaluator = BatchEvaluator(Path(base_dir), Path(task_dir), batch_size=batch_size, limit=limit, seed=seed,
                                   log=log)
        rows = continual_rows(evaluator.score(
            continual_candidates(base, experts, orders, params["alpha"], params["baseline_lambda"])))
        table = pd.DataFrame(rows)
        for i, (key, value) in enumerate((labels or {}).items()):
            table.insert(i, key, value)
        atomic_write_text(Path(curves_csv), table.to_csv(index=False))
        log(f"{evaluator.n_scored} intermediate merges over {len(orders)} order(s) scored in "
            f"{time.perf_counter() - t0:.1f}s -> {curves_csv}")
    finally:
        for c in checkpoints:
            c.close()
    return card


def continual_normalized(curves, expert_scores: Mapping[tuple[str, str], float]):
    """Per (setting, base, combo, method, order, step): the mean over the tasks merged so
    far of score / that task's expert score (tasks whose expert scores 0 are left out)."""
    from mergescale.tasks.combos import parse_combo

    df = curves.copy()
    df["expert"] = [expert_scores.get((b, t), float("nan")) for b, t in zip(df.base, df.task)]
    df = df[df.expert > 0]
    df["normalized"] = df.score / df.expert
    keys = ["setting", "base", "combo", "method", "order", "step"]
    out = df.groupby(keys, as_index=False).agg(held_in_normalized=("normalized", "mean"),
                                               held_in_raw=("score", "mean"), tasks=("task", "count"))
    out["k"] = out.combo.map(lambda c: parse_combo(c)[0])
    return out.sort_values(keys).reset_index(drop=True)


@register_rule_method(
    name="opcm",
    hyperparameters=HYPERPARAMETERS,
    paper=PAPER,
    description=DESCRIPTION,
    needs=("test_tasks",),
    own_rule=True,  # workflow/rules/methods/opcm.smk: its curves table and figure
)
def run(job: RuleJob) -> dict:
    return run_opcm_job(
        base_dir=job.base, expert_dirs=dict(zip(job.tasks, job.experts)), out_dir=job.out_dir,
        curves_csv=job.outputs["curves"], task_dir=job.data["test_tasks"][0].parent, params=job.params,
        labels=job.labels, dtype=job.dtype, seed=job.seed, log=job.log, **job.evaluate)
