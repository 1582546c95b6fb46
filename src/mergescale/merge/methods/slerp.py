"""SLERP: spherical linear interpolation between the base and one other model.

Shoemake 1985, "Animating rotation with quaternion curves"; popularised for model
merging by mergekit (https://github.com/arcee-ai/mergekit).

Per tensor, flattened: with unit directions a/|a|, b/|b| at angle theta,
    slerp(t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b
where a is the base tensor, b the expert's, t in [0, 1] (t = 0 gives the base). Nearly
colinear tensors (|cos theta| > dot_threshold) fall back to linear interpolation.
"""

from __future__ import annotations

import math

import torch

from mergescale.merge.ops import f32
from mergescale.merge.registry import Hyperparameter, register_method


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Interpolate float32 tensors a -> b along the great circle through their directions."""
    na, nb = float(a.norm()), float(b.norm())
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = math.acos(dot)
        coef_a = math.sin((1 - t) * theta) / math.sin(theta)
        coef_b = math.sin(t * theta) / math.sin(theta)
    return a.mul_(coef_a).add_(b, alpha=coef_b)


@register_method(
    name="slerp",
    hyperparameters=[
        Hyperparameter("t", "float", 0.5, "Interpolation factor: 0 = base, 1 = expert.", low=0.0, high=1.0),
        Hyperparameter(
            "dot_threshold", "float", 0.9995,
            "Above this |cos theta| the tensors are treated as colinear and interpolated linearly.",
            low=0.0, high=1.0,
        ),
    ],
    needs_base=True,
    min_experts=1,
    max_experts=1,
    paper="Shoemake 1985, SLERP; as in mergekit, https://en.wikipedia.org/wiki/Slerp",
    description="Spherical interpolation between the base and one expert, per tensor.",
)
def slerp_method(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    return slerp(params["t"], f32(base), f32(experts[0]), params["dot_threshold"])
