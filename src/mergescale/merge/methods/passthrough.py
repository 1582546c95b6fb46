"""Passthrough: copy one model's tensors, optionally scaled.

mergekit's `passthrough` (https://github.com/arcee-ai/mergekit); with a single expert it
re-saves that model (e.g. to change dtype or sharding) and with `scale` multiplies it.
"""

from __future__ import annotations

from mergescale.merge.ops import f32
from mergescale.merge.registry import Hyperparameter, register_method


@register_method(
    name="passthrough",
    hyperparameters=[Hyperparameter("scale", "float", 1.0, "Factor applied to every tensor.", per_expert=True)],
    needs_base=False,
    uses_base=False,
    min_experts=1,
    max_experts=1,
    paper="mergekit passthrough, https://github.com/arcee-ai/mergekit",
    description="Copy the one expert's weights, multiplied by scale.",
)
def passthrough(base, experts, expert_params, params, generator, name):
    out = f32(experts[0])
    scale = expert_params[0]["scale"]
    return out if scale == 1.0 else out.mul_(scale)
