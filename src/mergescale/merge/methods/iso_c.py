"""Iso-C: isotropic merging in the common subspace.

Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML), https://arxiv.org/abs/2502.04959

For each 2-D weight matrix, with the summed task vector tau = sum_i tau_i = U S V^T:
replace every singular value by their mean (a flat, "isotropic" spectrum so no task's
directions dominate): merged tau = mean(S) * U V^T. Other tensors take the mean task
vector. merged = base + lambda * merged tau.
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import task_vectors
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="iso_c",
    hyperparameters=[
        Hyperparameter("lambda", "float", 1.0, "Scale of the merged task vector (the paper tunes it, ~1-2)."),
    ],
    needs_base=True,
    paper="Marczak et al. 2025, No Task Left Behind (Iso-C), https://arxiv.org/abs/2502.04959",
    description="Sum of task vectors with a flattened (isotropic) singular spectrum per weight matrix.",
)
def iso_c(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    taus = task_vectors(base, experts)  # [K, ...]
    if base.dim() != 2:
        merged = taus.mean(dim=0)
    else:
        u, s, vh = torch.linalg.svd(taus.sum(dim=0), full_matrices=False)
        merged = (u * s.mean()) @ vh
    return base.to(torch.float32) + params["lambda"] * merged
