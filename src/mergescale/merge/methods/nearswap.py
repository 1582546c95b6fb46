"""NearSwap: take the expert's value where it is close to the base's (mergekit's
`nearswap`, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).

Per entry, with base a and expert b:
    w = clamp(t / max(|a - b|, 1e-6), 0, 1),   merged = w b + (1 - w) a
so entries within t of the base are swapped to the expert's, and farther ones move
towards it by t / |a - b|.
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import f32
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="nearswap",
    hyperparameters=[
        Hyperparameter("t", "float", 1e-4, "Distance below which the expert's value is taken whole.",
                       low=0.0),
    ],
    needs_base=True,
    min_experts=1,
    max_experts=1,
    paper="alchemonaut 2024, NearSwap, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    description="Swap in the expert's entries near the base's; move the others by t / distance.",
)
def nearswap(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    a, b = base.to(torch.float32), f32(experts[0])
    weight = (params["t"] / (a - b).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return (weight * b).add_((1 - weight).mul_(a))
