"""Consensus merging with TALL masks.

Wang et al. 2024, "Localizing Task Information for Improved Model Merging and
Compression" (ICML), https://arxiv.org/abs/2405.07813

With task vectors v_i = w_i tau_i and the multi-task vector tau_MTL = sum_i v_i:
  1. TALL mask per expert: m_i = |v_i| > lambda_i * |tau_MTL - v_i|
     (the entry matters to task i more than the rest of the merge disturbs it);
  2. consensus mask: entries that at least k experts mark, m = [sum_i m_i >= k]
     (k = 2 removes "selfish" entries used by one task and "catastrophic" ones used by none);
  3. merged = base + lambda * m * tau_MTL (Consensus Task Arithmetic).
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import task_vectors
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="consensus",
    hyperparameters=[
        Hyperparameter("weight", "float", 1.0, "Weight w_i of this expert's task vector.", per_expert=True),
        Hyperparameter(
            "tall_lambda", "float", 0.4, "TALL mask threshold lambda_i (the paper searches 0.2-0.6).",
            low=0.0, per_expert=True,
        ),
        Hyperparameter("k", "int", 2, "Minimum number of experts whose TALL mask keeps an entry.", low=0),
        Hyperparameter("lambda", "float", 1.0, "Scale of the masked multi-task vector added to the base."),
    ],
    needs_base=True,
    paper="Wang et al. 2024, Localizing Task Information (TALL masks, consensus), https://arxiv.org/abs/2405.07813",
    description="Task arithmetic restricted to entries that at least k experts' TALL masks deem important.",
)
def consensus(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    v = task_vectors(base, experts)  # [K, ...]
    for i, p in enumerate(expert_params):
        v[i].mul_(p["weight"])
    mtl = v.sum(dim=0)
    votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for i, p in enumerate(expert_params):
        votes += v[i].abs() > p["tall_lambda"] * (mtl - v[i]).abs()
    keep = votes >= params["k"]
    return base.to(torch.float32) + params["lambda"] * mtl * keep
