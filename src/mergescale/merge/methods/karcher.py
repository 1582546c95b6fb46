"""Karcher mean: the Riemannian centre of mass of the experts on a hypersphere.

Karcher 1977, "Riemannian center of mass and mollifier smoothing",
https://doi.org/10.1002/cpa.3160300502; used for model merging in mergekit.

Per tensor, flattened: unit directions u_i = x_i / |x_i| with weights a_i (normalised).
Start from the normalised weighted mean direction m and iterate (at most max_iter times,
until the step is below tol):
    tangent = sum_i a_i * theta_i / sin(theta_i) * (u_i - cos(theta_i) m),  theta_i = angle(m, u_i)
    m <- cos|tangent| m + sin|tangent| tangent / |tangent|
The result is m scaled by the weighted mean norm sum_i a_i |x_i|. The base model, if
given, is not used: list it as an expert to include it.
"""

from __future__ import annotations

import math

import torch

from mergescale.merge.ops import f32
from mergescale.merge.registry import Hyperparameter, register_method


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(t.norm()) for t in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(flat[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = sum(a * u for a, u in zip(weights, units))
    mean_norm = float(mean.norm())
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, units):
            dot = max(-1.0, min(1.0, float(torch.dot(mean, u))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent.add_(u - dot * mean, alpha=a * theta / math.sin(theta))
        step = float(tangent.norm())
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        mean = mean / max(float(mean.norm()), tol)
    scale = sum(a * n for a, n in zip(alphas, norms)) / sum(alphas)
    return mean * scale


@register_method(
    name="karcher",
    hyperparameters=[
        Hyperparameter("weight", "float", 1.0, "Weight of this expert.", per_expert=True, low=0.0, low_inclusive=False),
        Hyperparameter("max_iter", "int", 10, "Maximum fixed-point iterations.", low=1),
        Hyperparameter("tol", "float", 1e-5, "Convergence tolerance on the tangent step.", low=0.0, low_inclusive=False),
    ],
    needs_base=False,
    uses_base=False,
    paper="Karcher 1977, Riemannian center of mass, https://doi.org/10.1002/cpa.3160300502",
    description="Weighted Riemannian (Karcher) mean of the experts' directions, scaled by their mean norm.",
)
def karcher(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    if len(experts) == 1:
        return f32(experts[0])
    alphas = [p["weight"] for p in expert_params]
    merged = karcher_mean([f32(x) for x in experts], alphas, params["max_iter"], params["tol"])
    return merged.reshape(experts[0].shape)
