"""Fisher-weighted averaging.

Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging",
https://arxiv.org/abs/2111.09832

Each expert's parameters are weighted, entry by entry, by its diagonal empirical Fisher
F_i (computed once per expert by the compute_stats rule, see mergescale.merge.statistics):

    merged = sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps)

eps keeps entries no example touched (every expert's Fisher is 0 there) at the plain
weighted average. With equal Fishers this is exactly the weighted average.
"""

from __future__ import annotations

import torch

from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import Hyperparameter, register_method

WEIGHT = Hyperparameter("weight", "float", 1.0, "Weight w_i of this expert.", low=0.0, per_expert=True)
EPSILON = Hyperparameter(
    "epsilon", "float", 1e-8, "Floor added to every Fisher entry (keeps untouched entries averaged).",
    low=0.0, high=1.0, low_inclusive=False,
)


@register_method(
    name="fisher",
    hyperparameters=[WEIGHT, EPSILON],
    needs_base=False,
    paper="Matena & Raffel 2022, Fisher-weighted averaging, https://arxiv.org/abs/2111.09832",
    description="Average of the experts weighted entry by entry by their diagonal Fisher information.",
    stats=("fisher",),
)
def fisher(base, experts, expert_params, params, generator, name, *, stats) -> torch.Tensor:
    num = torch.zeros_like(experts[0], dtype=torch.float32)
    den = torch.zeros_like(num)
    for x, p, s in zip(experts, expert_params, stats):
        f = s["fisher"].to(torch.float32).add(params["epsilon"]).mul_(p["weight"])
        num.addcmul_(f, x.to(torch.float32))
        den.add_(f)
    if not bool((den > 0).all()):
        raise MergeInputError("fisher: expert weights sum to 0")
    return num.div_(den)
