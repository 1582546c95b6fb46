"""Linear averaging ("model soup").

Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", https://arxiv.org/abs/2203.05482

merged = sum_i w_i * theta_i / sum_i w_i   (without the division when normalize=false)

The base model, if any, is not part of the average: list it as an expert to include it.
"""

from __future__ import annotations

import torch

from mergescale.merge.errors import MergeInputError
from mergescale.merge.ops import f32
from mergescale.merge.registry import Hyperparameter, register_method

WEIGHT = Hyperparameter(
    "weight", "float", 1.0, "Weight of this expert in the sum.", per_expert=True
)


@register_method(
    name="linear",
    hyperparameters=[
        WEIGHT,
        Hyperparameter("normalize", "bool", True, "Divide by the sum of weights."),
    ],
    needs_base=False,
    paper="Wortsman et al. 2022, Model soups, https://arxiv.org/abs/2203.05482",
    description="Weighted average of the experts' weights (model soup).",
)
def linear(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    weights = [p["weight"] for p in expert_params]
    out = f32(experts[0]).mul_(weights[0])
    for x, w in zip(experts[1:], weights[1:]):
        out.add_(x.to(torch.float32), alpha=w)
    if params["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise MergeInputError("linear: expert weights sum to 0, cannot normalize (set normalize: false)")
        out.div_(total)
    return out
