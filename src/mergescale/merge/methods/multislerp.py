"""Multi-SLERP: barycentric interpolation of several models on a hypersphere.

Goddard 2025, "Multislerp", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea
(the generalisation of SLERP to n models used by mergekit).

Per tensor, flattened, with x_i = expert_i - base (or expert_i without a base):
  1. unit directions u_i = x_i / |x_i|, weights w_i (normalised to sum to 1);
  2. mean direction m = normalise(sum_i w_i u_i);
  3. tangent vectors at m: v_i = u_i - (u_i . m) m, combined: v = sum_i w_i v_i;
  4. back to the sphere by the exponential map: r = cos|v| m + sin|v| v / |v|;
  5. rescaled by the weighted mean norm sum_i w_i |x_i|, plus the base.
"""

from __future__ import annotations

import torch

from mergescale.merge.errors import MergeInputError
from mergescale.merge.ops import f32
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="multislerp",
    hyperparameters=[
        Hyperparameter("weight", "float", 1.0, "Weight of this expert.", per_expert=True),
        Hyperparameter("normalize_weights", "bool", True, "Scale the weights to sum to 1."),
        Hyperparameter("eps", "float", 1e-8, "Numerical floor for norms.", low=0.0, low_inclusive=False),
    ],
    needs_base=False,
    uses_base=True,
    paper="Goddard 2025, Multislerp, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    description="Weighted spherical (tangent-space) interpolation of n experts, around the base if given.",
)
def multislerp(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    if len(experts) == 1:
        return f32(experts[0])
    eps = params["eps"]
    xs = torch.stack([f32(x).reshape(-1) for x in experts])  # [K, N]
    base32 = base.reshape(-1).to(torch.float32) if base is not None else None
    if base32 is not None:
        xs.sub_(base32)
    w = torch.tensor([p["weight"] for p in expert_params], dtype=torch.float32, device=xs.device)
    if params["normalize_weights"]:
        w = w / w.sum()
    norms = xs.norm(dim=1, keepdim=True)  # [K, 1]
    units = xs.div_(norms + eps)  # [K, N], in place: xs is ours
    mean = w @ units  # [N]
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(experts) == 2:  # antipodal pair: linear interpolation is the only answer
            result = (w[0] * norms[0]) * units[0] + (w[1] * norms[1]) * units[1]
            return (result + base32 if base32 is not None else result).reshape(experts[0].shape)
        raise MergeInputError("multislerp: the weighted mean direction is zero (antipodal experts); change the weights")
    mean = mean / mean_norm
    tangents = units - (units @ mean).unsqueeze(1) * mean  # [K, N]
    v = w @ tangents  # [N]
    v_norm = v.norm() + eps
    result = mean * torch.cos(v_norm) + v * (torch.sin(v_norm) / v_norm)
    result = result * (norms.squeeze(1) * w).sum()
    if base32 is not None:
        result = result + base32
    return result.reshape(experts[0].shape)
