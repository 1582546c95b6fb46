"""Generalised task arithmetic: one function, eight methods.

Task vectors tau_i = theta_i - theta_base (Ilharco et al. 2023) are
  1. sparsified per expert (none | magnitude top-k | random drop | outlier band | DELLA),
     optionally rescaled by 1 / keep-probability so their expected value is unchanged,
  2. weighted: w_i * tau_i,
  3. combined: summed (linear) or, with sign consensus, TIES's elect + disjoint merge:
     the elected sign is sign(sum_i w_i tau_i) per element, and only entries agreeing
     with it are summed,
  4. optionally normalised by the sum of weights that contributed (TIES's disjoint mean),
  5. scaled by lambda and added to the base.

| method           | sparsifier     | consensus | normalize | rescale | paper |
|------------------|----------------|-----------|-----------|---------|-------|
| task_arithmetic  | none           | -         | false     | -       | https://arxiv.org/abs/2212.04089 |
| ties             | magnitude      | sum       | true      | false   | https://arxiv.org/abs/2306.01708 |
| dare_linear      | random         | -         | false     | true    | https://arxiv.org/abs/2311.03099 |
| dare_ties        | random         | sum       | false     | true    | https://arxiv.org/abs/2311.03099 |
| breadcrumbs      | outlier band   | -         | false     | false   | https://arxiv.org/abs/2312.06795 |
| breadcrumbs_ties | outlier band   | sum       | false     | false   | https://arxiv.org/abs/2312.06795 |
| della            | DELLA MagPrune | sum       | true      | true    | https://arxiv.org/abs/2406.11617 |
| della_linear     | DELLA MagPrune | -         | false     | true    | https://arxiv.org/abs/2406.11617 |

Names, defaults and the sum consensus follow mergekit's generalised task arithmetic.
Rescaling follows the papers (DARE: divide by the density; DELLA: divide each kept
entry by its own keep probability), where mergekit 0.1.5 instead matches the L1 norm.
"""

from __future__ import annotations

from functools import partial

import torch

from mergescale.merge import ops
from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import Hyperparameter, register_method

WEIGHT = Hyperparameter(
    "weight", "float", 1.0, "Weight w_i of this expert's task vector.", per_expert=True
)
DENSITY = Hyperparameter(
    "density", "float", 1.0,
    "Fraction of task-vector entries kept (1 keeps all; TIES uses 0.2, DARE 0.1-0.5).",
    low=0.0, high=1.0, low_inclusive=False, per_expert=True,
)
GAMMA = Hyperparameter(
    "gamma", "float", 0.01, "Fraction of largest-magnitude entries dropped as outliers.",
    low=0.0, high=1.0, high_inclusive=False, per_expert=True,
)
EPSILON = Hyperparameter(
    "epsilon", "float", 0.15,
    "Half-width of DELLA's keep-probability range: density -/+ epsilon by magnitude rank.",
    low=0.0, high=0.5, high_inclusive=False, per_expert=True,
)
LAMBDA = Hyperparameter("lambda", "float", 1.0, "Scale of the merged task vector added to the base.")


def _normalize(default: bool) -> Hyperparameter:
    return Hyperparameter(
        "normalize", "bool", default, "Divide by the sum of the weights that contributed to each entry."
    )


def _rescale(default: bool) -> Hyperparameter:
    return Hyperparameter(
        "rescale", "bool", default, "Divide kept entries by their keep probability (unbiased drop)."
    )


def sparsify(
    tau: torch.Tensor,
    sparsifier: str | None,
    p: dict,
    rescale: bool,
    generator: torch.Generator | None,
    name: str,
) -> torch.Tensor:
    """Sparsify one task vector in place; returns it."""
    if sparsifier is None or p["density"] >= 1:
        return tau
    density = p["density"]
    if sparsifier == "magnitude":
        tau.mul_(ops.magnitude_mask(tau, density))
        keep = density
    elif sparsifier == "random":
        tau.mul_(ops.random_mask(tau, density, generator))
        keep = density
    elif sparsifier == "outliers":
        tau.mul_(ops.outlier_mask(tau, density, p["gamma"]))
        keep = density
    elif sparsifier == "della":
        eps = p["epsilon"]
        if density - eps <= 0 or density + eps > 1:
            raise MergeInputError(
                f"density={density} and epsilon={eps}: density - epsilon must be > 0 and "
                "density + epsilon <= 1"
            )
        keep_probability = ops.della_keep_probability(tau, density, eps)
        tau.mul_(ops.random_mask(tau, keep_probability, generator))
        if rescale:
            tau.div_(keep_probability)
        return tau
    else:
        raise ValueError(f"unknown sparsifier {sparsifier!r}")
    if rescale:
        tau.div_(keep)
    return tau


def generalized_task_arithmetic(
    base, experts, expert_params, params, generator, name, *, sparsifier: str | None, consensus: str | None
) -> torch.Tensor:
    base32 = ops.f32(base)
    weights = torch.tensor([p["weight"] for p in expert_params], dtype=torch.float32, device=base32.device)
    deltas = torch.empty((len(experts), *base32.shape), dtype=torch.float32, device=base32.device)  # [K, ...]
    for i, (x, p) in enumerate(zip(experts, expert_params)):
        tau = ops.task_vector(x, base32)
        deltas[i] = sparsify(tau, sparsifier, p, params.get("rescale", False), generator, name).mul_(p["weight"])
        del tau
    w = weights.reshape(-1, *([1] * base32.dim()))  # [K, 1, ...] broadcasts over the tensor

    if consensus is not None:
        agree = ops.agrees_with(deltas, ops.elect_sign(deltas, consensus))  # [K, ...]
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    del deltas
    if params["normalize"]:
        mixed.div_(divisor)
    return base32.add_(mixed, alpha=params["lambda"])


def _register(name, sparsifier, consensus, normalize, rescale, paper, description, randomised=False):
    hps = [WEIGHT]
    if sparsifier is not None:
        hps.append(DENSITY)
    if sparsifier == "outliers":
        hps.append(GAMMA)
    if sparsifier == "della":
        hps.append(EPSILON)
    hps += [LAMBDA, _normalize(normalize)]
    if sparsifier is not None:
        hps.append(_rescale(rescale))
    fn = partial(generalized_task_arithmetic, sparsifier=sparsifier, consensus=consensus)
    register_method(
        name=name,
        hyperparameters=hps,
        needs_base=True,
        randomised=randomised,
        paper=paper,
        description=description,
    )(fn)


_register(
    "task_arithmetic", None, None, False, False,
    "Ilharco et al. 2023, Editing models with task arithmetic, https://arxiv.org/abs/2212.04089",
    "Base plus lambda times the weighted sum of task vectors.",
)
_register(
    "ties", "magnitude", "sum", True, False,
    "Yadav et al. 2023, TIES-Merging, https://arxiv.org/abs/2306.01708",
    "Trim task vectors to their top-density magnitudes, elect a sign per entry, average the agreeing entries.",
)
_register(
    "dare_linear", "random", None, False, True,
    "Yu et al. 2024, Language models are Super Mario (DARE), https://arxiv.org/abs/2311.03099",
    "Randomly drop task-vector entries (keep with probability density), rescale, and add their weighted sum.",
    randomised=True,
)
_register(
    "dare_ties", "random", "sum", False, True,
    "Yu et al. 2024, Language models are Super Mario (DARE), https://arxiv.org/abs/2311.03099",
    "DARE random drop and rescale, then TIES sign election and disjoint sum.",
    randomised=True,
)
_register(
    "breadcrumbs", "outliers", None, False, False,
    "Davari & Belilovsky 2024, Model Breadcrumbs, https://arxiv.org/abs/2312.06795",
    "Drop the largest (gamma) and smallest task-vector entries, keep density, add the weighted sum.",
)
_register(
    "breadcrumbs_ties", "outliers", "sum", False, False,
    "Davari & Belilovsky 2024, Model Breadcrumbs, https://arxiv.org/abs/2312.06795",
    "Breadcrumbs' outlier-band sparsification followed by TIES sign election.",
)
_register(
    "della", "della", "sum", True, True,
    "Deep et al. 2024, DELLA-Merging, https://arxiv.org/abs/2406.11617",
    "Drop entries with probability falling with magnitude rank (MagPrune), rescale, elect signs, average.",
    randomised=True,
)
_register(
    "della_linear", "della", None, False, True,
    "Deep et al. 2024, DELLA-Merging, https://arxiv.org/abs/2406.11617",
    "DELLA's MagPrune drop and rescale, then a weighted sum of task vectors.",
    randomised=True,
)
