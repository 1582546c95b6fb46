"""Layer swapping: bottom and top transformer layers from one expert, the rest from another.

Bandarkar et al. 2025, "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large
Language Models" (ICLR), https://arxiv.org/abs/2410.01335

Two experts fine-tuned from the same base: experts[0] gives the middle layers (in the
paper, the math expert), experts[1] the `n_bottom` first and `n_top` last transformer
layers (the language expert). Tensors outside the transformer blocks (embeddings, final
norm, LM head) come from the expert named by `outside_layers`. The layer of a tensor is
read from its name ("model.layers.3.*"); the layer count from all tensor names.
"""

from __future__ import annotations

from mergescale.merge.errors import MergeInputError
from mergescale.merge.ops import f32, layer_index
from mergescale.merge.registry import Hyperparameter, register_method


def _count_layers(names: list[str], config: dict | None) -> dict:
    indices = [i for i in map(layer_index, names) if i is not None]
    if not indices:
        raise MergeInputError("layer_swap: no transformer layers ('*.layers.N.*') found in the tensor names")
    return {"num_layers": max(indices) + 1}


@register_method(
    name="layer_swap",
    hyperparameters=[
        Hyperparameter("n_bottom", "int", 1, "How many first layers come from the second expert.", low=0),
        Hyperparameter("n_top", "int", 1, "How many last layers come from the second expert.", low=0),
        Hyperparameter(
            "outside_layers", "str", "second", "Which expert gives embeddings, final norm and LM head.",
            choices=("first", "second"),
        ),
    ],
    needs_base=False,
    uses_base=False,
    min_experts=2,
    max_experts=2,
    setup=_count_layers,
    paper="Bandarkar et al. 2025, Layer Swapping, https://arxiv.org/abs/2410.01335",
    description="Middle transformer layers from the first expert, bottom/top layers from the second.",
)
def layer_swap(base, experts, expert_params, params, generator, name):
    n_layers = params["num_layers"]
    if params["n_bottom"] + params["n_top"] > n_layers:
        raise MergeInputError(
            f"n_bottom + n_top = {params['n_bottom'] + params['n_top']} exceeds the {n_layers} layers"
        )
    layer = layer_index(name)
    if layer is None:
        source = 0 if params["outside_layers"] == "first" else 1
    else:
        outer = layer < params["n_bottom"] or layer >= n_layers - params["n_top"]
        source = 1 if outer else 0
    return f32(experts[source])
