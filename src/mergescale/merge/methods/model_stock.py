"""Model Stock: interpolate between the experts' average and the base by their geometry.

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522

With k experts and cos(theta) the mean pairwise cosine similarity of the task vectors
tau_i = theta_i - theta_0 (per tensor, or per output row when filter_wise),
    t = k cos(theta) / (1 + (k - 1) cos(theta))
    merged = t * mean_i(theta_i) + (1 - t) * theta_0
Where 1 + (k - 1) cos(theta) is 0 the base is kept (as mergekit does).
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import task_vectors
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="model_stock",
    hyperparameters=[
        Hyperparameter("filter_wise", "bool", False, "One interpolation ratio per output row instead of per tensor."),
    ],
    needs_base=True,
    min_experts=2,
    paper="Jang et al. 2024, Model Stock, https://arxiv.org/abs/2403.19522",
    description="Average of the experts pulled towards the base by a ratio from their task vectors' angles.",
)
def model_stock(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    k = len(experts)
    taus = task_vectors(base, experts)  # [K, ...]
    if params["filter_wise"] and base.dim() >= 1:
        flat = taus.reshape(k, base.shape[0] if base.dim() > 1 else 1, -1)  # [K, rows, cols]
    else:
        flat = taus.reshape(k, 1, -1)  # [K, 1, N]
    norms = flat.norm(dim=-1)  # [K, rows]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            dots = (flat[i] * flat[j]).sum(dim=-1)
            cosines.append((dots / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)  # [rows]
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))  # [rows]
    # mean_i theta_i = theta_0 + mean_i tau_i, so merged = theta_0 + t * mean_i tau_i
    mean_tau = flat.mean(dim=0)  # [rows, cols]
    merged = base.to(torch.float32).reshape(mean_tau.shape) + t.unsqueeze(-1) * mean_tau
    return merged.reshape(base.shape)
