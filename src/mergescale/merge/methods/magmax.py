"""MagMax: per entry, keep the task-vector value of largest magnitude.

Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual
Learning" (ECCV), https://arxiv.org/abs/2407.06322

    merged = base + lambda * tau_{j*},  j* = argmax_i |tau_i|   (elementwise)
Ties in magnitude go to the expert listed first.
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import task_vectors
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="magmax",
    hyperparameters=[Hyperparameter("lambda", "float", 1.0, "Scale of the selected task vector.")],
    needs_base=True,
    paper="Marczak et al. 2024, MagMax, https://arxiv.org/abs/2407.06322",
    description="For every entry, the task-vector value with the largest magnitude across experts.",
)
def magmax(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    taus = task_vectors(base, experts)  # [K, ...]
    winner = taus.abs().argmax(dim=0, keepdim=True)  # first maximum on ties
    selected = taus.gather(0, winner).squeeze(0)
    return base.to(torch.float32) + params["lambda"] * selected
