"""PCB-Merging: Parameter Competition Balancing.

Du et al. 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS),
https://arxiv.org/abs/2410.02396 (reference code: github.com/duguodong7/pcb-merging)

Per tensor, with the K task vectors flattened into rows tau_i:
  1. clip |tau_i| to its own [clip_ratio, 1 - clip_ratio] quantiles (outliers);
  2. intra-balancing: exp(K * minmax(|tau_i|)^2) -- large entries within a task matter;
  3. inter-balancing: tanh(tau_i * sum_j tau_j) -- agreement with the other tasks;
  4. score_i = intra * inter; keep each row's top `density` fraction of scores and
     min-max normalise the kept scores to [0, 1] (the rest get 0);
  5. merged tau = sum_i score_i * clipped tau_i / sum_i score_i;
  6. merged = base + lambda * merged tau.
The paper flattens the whole model; like the other per-tensor methods here, this
applies the same steps to each tensor.
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import task_vectors
from mergescale.merge.registry import Hyperparameter, register_method


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to [0, 1]; constant rows become 0."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return (x - lo) / torch.where(span > 0, span, 1.0)


def _row_quantile(x: torch.Tensor, index: int) -> torch.Tensor:
    """The element at sorted position `index` of each row (0 = smallest), without sorting."""
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


@register_method(
    name="pcb",
    hyperparameters=[
        Hyperparameter("density", "float", 0.1, "Fraction of entries kept per expert (the paper's r).",
                       low=0.0, high=1.0, low_inclusive=False),
        Hyperparameter("clip_ratio", "float", 1e-4, "Fraction clipped at each end of |tau| before scoring.",
                       low=0.0, high=0.5, high_inclusive=False),
        Hyperparameter("lambda", "float", 1.0, "Scale of the merged task vector."),
    ],
    needs_base=True,
    paper="Du et al. 2024, Parameter Competition Balancing, https://arxiv.org/abs/2410.02396",
    description="Weight each entry by within-task importance and cross-task agreement, keep the top, average.",
)
def pcb(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    k = len(experts)
    taus = task_vectors(base, experts).reshape(k, -1)  # [K, N]
    n = taus.shape[1]
    magnitude = taus.abs()
    clip = params["clip_ratio"]
    magnitude = magnitude.clamp(
        min=_row_quantile(magnitude, int(n * clip)), max=_row_quantile(magnitude, max(int(n * (1 - clip)) - 1, 0))
    )
    clipped = taus.sign() * magnitude
    intra = torch.exp(k * _minmax(magnitude) ** 2)
    inter = torch.tanh(taus * taus.sum(dim=0))
    score = intra * inter  # [K, N]
    # keep the top `density` of each row: clamping below at that quantile sends the
    # rest to the row minimum, which min-max normalisation maps to 0
    floor = _row_quantile(score, min(int(n * (1 - params["density"])), n - 1))
    scale = _minmax(score.clamp(min=floor))
    merged = (clipped * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)
    return base.to(torch.float32) + params["lambda"] * merged.reshape(base.shape)
