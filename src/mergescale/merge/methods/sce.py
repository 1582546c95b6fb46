"""SCE: Select, Calculate, Erase.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models",
https://arxiv.org/abs/2408.07990 (as implemented in mergekit's `sce`).

Per tensor, with task vectors tau_i = theta_i - theta_0:
  1. Select: keep the entries whose variance across experts is in the top
     `select_topk` fraction (of entries with non-zero variance);
  2. Calculate: expert weight w_i = mean(tau_i^2) / sum_j mean(tau_j^2) (after selection);
  3. Erase: drop entries whose sign disagrees with sign(sum_i tau_i) (TIES election);
  4. merged = theta_0 + sum_i w_i tau_i m_i / max(sum_i w_i m_i, 1e-6).
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import agrees_with, elect_sign, task_vectors, top_k_mask
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="sce",
    hyperparameters=[
        Hyperparameter("select_topk", "float", 1.0, "Fraction of highest-variance entries kept.",
                       low=0.0, high=1.0, low_inclusive=False),
    ],
    needs_base=True,
    paper="Wan et al. 2024, FuseChat (SCE merging), https://arxiv.org/abs/2408.07990",
    description="Keep high-variance entries, weight experts by task-vector energy, erase sign conflicts.",
)
def sce(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    taus = task_vectors(base, experts)  # [K, ...]
    if params["select_topk"] < 1:
        variance = taus.var(dim=0, unbiased=False)
        keep = int(int(torch.count_nonzero(variance)) * params["select_topk"])
        taus.mul_(top_k_mask(variance, keep))
    energy = taus.square().reshape(len(experts), -1).mean(dim=1)  # [K]
    total = float(energy.sum())
    weights = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / len(experts))
    weights = weights.reshape(-1, *([1] * base.dim()))  # [K, 1, ...]
    erase = agrees_with(taus, elect_sign(taus, "sum"))  # [K, ...]
    kept_weights = weights * erase
    merged = (taus * kept_weights).sum(dim=0) / kept_weights.sum(dim=0).clamp(min=1e-6)
    return base.to(torch.float32) + merged
