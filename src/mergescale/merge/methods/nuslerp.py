"""NuSLERP: SLERP between two models, row by row or over the flattened tensor, with
weights instead of t, optionally around a base (mergekit's `nuslerp`).

Per tensor, with x_i = expert_i - base (or expert_i without a base) and
t = w_2 / (w_1 + w_2) (0.5 when the weights sum to ~0):
    nuslerp(t) = (sin((1 - t) theta) x_1 + sin(t theta) x_2) / sin(theta)
where theta is the angle between x_1 and x_2, measured per vector: the whole flattened
tensor (nuslerp_flatten, the default), each row, or each column (nuslerp_row_wise,
mergekit's name for it). Exactly colinear vectors interpolate linearly.
"""

from __future__ import annotations

import torch

from mergescale.merge.ops import f32
from mergescale.merge.registry import Hyperparameter, register_method


def nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, columns: bool, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    """Interpolate float32 tensors a -> b per vector (last axis after the reshape)."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif columns:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if columns and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register_method(
    name="nuslerp",
    hyperparameters=[
        Hyperparameter("weight", "float", 1.0, "Weight of this expert; t = w_2 / (w_1 + w_2).", per_expert=True),
        Hyperparameter("nuslerp_flatten", "bool", True, "Interpolate the flattened tensor as one vector."),
        Hyperparameter("nuslerp_row_wise", "bool", False,
                       "Without flattening: interpolate columns (true) or rows (false), as mergekit names it."),
    ],
    needs_base=False,
    uses_base=True,
    min_experts=2,
    max_experts=2,
    paper="Goddard 2024, NuSLERP in mergekit, https://github.com/arcee-ai/mergekit",
    description="Weighted spherical interpolation of two experts (their task vectors around a base, if given).",
)
def nuslerp_method(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    w1, w2 = expert_params[0]["weight"], expert_params[1]["weight"]
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    a, b = f32(experts[0]), f32(experts[1])
    if base is not None:
        base32 = base.to(torch.float32)
        a.sub_(base32)
        b.sub_(base32)
    out = nuslerp(t, a, b, columns=params["nuslerp_row_wise"], flatten=params["nuslerp_flatten"])
    return out.add_(base32) if base is not None else out
