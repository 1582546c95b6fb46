"""TSV-Merge: Task Singular Vectors.

Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging" (CVPR), https://arxiv.org/abs/2412.00081

For each 2-D weight matrix, with K task vectors tau_i = U_i S_i V_i^T (thin SVD, rank r):
  1. keep each task's top r/K singular triplets (the paper's 1/K reduction);
  2. concatenate U = [U_1' ... U_K'], S = diag(S_1' ... S_K'), V = [V_1' ... V_K'];
  3. remove interference by replacing U and V with their nearest orthonormal matrices
     (U -> P Q^T from U = P Sigma Q^T, likewise V);
  4. merged tau = U S V^T; merged = base + lambda * merged tau.
Other tensors (norms, biases) take the mean task vector.
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import orthogonalize, task_vectors
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="tsv",
    hyperparameters=[
        Hyperparameter("lambda", "float", 1.0, "Scale of the merged task vector (the paper's alpha = 1)."),
    ],
    needs_base=True,
    paper="Gargiulo et al. 2025, Task Singular Vectors (TSV-Merge), https://arxiv.org/abs/2412.00081",
    description="Low-rank task vectors via SVD, decorrelated by orthogonalising their singular vectors.",
)
def tsv(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    taus = task_vectors(base, experts)  # [K, ...]
    k = len(experts)
    if base.dim() != 2:
        merged = taus.mean(dim=0)
    else:
        rows, cols = base.shape
        rank = min(rows, cols)
        keep = max(1, rank // k)
        us, ss, vs = [], [], []
        for tau in taus:
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)  # u [rows, r], s [r], vh [r, cols]
            us.append(u[:, :keep])
            ss.append(s[:keep])
            vs.append(vh[:keep])
        u = orthogonalize(torch.cat(us, dim=1))  # [rows, K*keep]
        vh = orthogonalize(torch.cat(vs, dim=0))  # [K*keep, cols]
        merged = (u * torch.cat(ss)) @ vh  # U diag(S) V^T
    return base.to(torch.float32) + params["lambda"] * merged
