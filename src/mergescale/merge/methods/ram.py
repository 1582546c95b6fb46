"""RAM: Reinforced Agent Merging (mergekit's `ram` and `ramplus_tl`).

https://arxiv.org/abs/2601.13572. Per tensor, with task vectors tau_i = expert_i - base
and the entries each expert changes (|tau_i| > epsilon):
  ram:         an entry changed by one expert takes that expert's value; an entry
               changed by c > 1 experts takes their mean; unchanged entries stay the base's.
  ramplus_tl:  as ram, but each expert's unique entries are scaled by
               1 + r * clamp(rho_i, 0, alpha), rho_i = (its shared entries) / (its unique
               entries), computed per tensor ("tensor-local").
"""

from __future__ import annotations

import torch

from mergescale.merge.registry import Hyperparameter, register_method

EPSILON = Hyperparameter("epsilon", "float", 1e-5, "A task-vector entry counts as changed above this magnitude.",
                         low=0.0)


def _ram(base, experts, epsilon: float, scales=None):
    b = base.reshape(-1).to(torch.float32)
    tau = torch.stack([x.reshape(-1).to(torch.float32) for x in experts]).sub_(b)  # [K, N]
    changed = tau.abs() > epsilon
    counts = changed.sum(dim=0)  # [N]
    tau.mul_(changed)
    unique = counts == 1
    if scales is not None:
        lam = scales(changed, unique, counts)  # [K]
        tau.mul_(torch.where(unique, lam.unsqueeze(1), 1.0 / counts.clamp(min=1)))
        merged = tau.sum(dim=0)
    else:
        merged = tau.sum(dim=0).div_(counts.clamp(min=1))
    return merged.add_(b).reshape(base.shape)


@register_method(
    name="ram",
    hyperparameters=[EPSILON],
    needs_base=True,
    paper="Reinforced Agent Merging, https://arxiv.org/abs/2601.13572",
    description="Entries changed by one expert keep its value; entries changed by several take their mean.",
)
def ram(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    return _ram(base, experts, params["epsilon"])


@register_method(
    name="ramplus_tl",
    hyperparameters=[
        Hyperparameter("r", "float", 0.1, "Strength of the boost of each expert's unique entries.", low=0.0),
        Hyperparameter("alpha", "float", 0.2, "Cap on the shared-to-unique ratio rho.", low=0.0),
        EPSILON,
    ],
    needs_base=True,
    paper="Reinforced Agent Merging, https://arxiv.org/abs/2601.13572",
    description="RAM with each expert's unique entries boosted by its shared-to-unique ratio, per tensor.",
)
def ramplus_tl(base, experts, expert_params, params, generator, name) -> torch.Tensor:
    r, alpha, eps = params["r"], params["alpha"], params["epsilon"]

    def scales(changed, unique, counts):
        shared = (changed & (counts > 1)).sum(dim=1).to(torch.float32)
        own = (changed & unique).sum(dim=1).to(torch.float32)
        return 1 + r * (shared / own.clamp(min=eps)).clamp(0, alpha)

    return _ram(base, experts, eps, scales)
