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
    low=0.0, high=1.0, low_inclusive=False, per_expert=True, grid=(0.1, 0.2, 0.5),
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
LAMBDA = Hyperparameter("lambda", "float", 1.0, "Scale of the merged task vector added to the base.",
                        grid=(0.3, 0.5, 0.7, 1.0))


def _normalize(default: bool) -> Hyperparameter:
    return Hyperparameter(
        "normalize", "bool", default, "Divide by the sum of the weights that contributed to each entry."
    )


def _rescale(default: bool) -> Hyperparameter:
    return Hyperparameter(
        "rescale", "bool", default, "Divide kept entries by their keep probability (unbiased drop)."
    )


class _Sparsifier:
    """One expert's sparsifier.

    Magnitude-based kinds need the whole task vector to rank it: `trim_whole` does that
    in one go when the task vector is in memory; otherwise `select_streamed` finds the
    thresholds (recomputing |tau| slice by slice) and `apply` trims chunk by chunk.
    """

    def __init__(self, kind: str | None, p: dict, rescale: bool, n: int, generator):
        self.kind = None if (kind is None or p["density"] >= 1) else kind
        self.density = p.get("density", 1.0)
        self.rescale = rescale
        self.generator = generator
        self.trimmed = False
        if self.kind == "magnitude":
            self.k = ops.magnitude_k(n, self.density)
        elif self.kind == "outliers":
            n_top, keep = ops.outlier_band(n, self.density, p["gamma"])
            self.k, self.k_outliers = n_top + keep, n_top
        elif self.kind == "della":
            self.epsilon = p["epsilon"]
            if self.density - self.epsilon <= 0 or self.density + self.epsilon > 1:
                raise MergeInputError(
                    f"density={self.density} and epsilon={self.epsilon}: density - epsilon must be > 0 "
                    "and density + epsilon <= 1"
                )

    def trim_whole(self, tau: torch.Tensor) -> None:
        """Magnitude kinds: trim the whole (flat) task vector in place."""
        if self.kind == "magnitude":
            ops.top_k_trim_(tau, self.k)
        elif self.kind == "outliers":
            # nested top-k sets: the band is the big set minus the outliers
            tau.copy_(ops.top_k_trim(tau, self.k).sub_(ops.top_k_trim(tau, self.k_outliers)))
        else:
            return
        self.trimmed = True

    def select_streamed(self, n: int, scores_of) -> None:
        """Magnitude kinds: find thresholds now, trim per chunk in `apply`."""
        if self.kind == "magnitude":
            self.top = ops.select_top_k(scores_of, n, self.k)
        elif self.kind == "outliers":
            self.top = ops.select_top_k(scores_of, n, self.k)
            self.outliers = ops.select_top_k(scores_of, n, self.k_outliers)

    def apply(self, tau: torch.Tensor, rows: int) -> torch.Tensor:
        """Sparsify one chunk in place (`rows`: how many rows the chunk holds, for DELLA)."""
        if self.kind is None:
            return tau
        if self.kind in ("magnitude", "outliers"):
            if not self.trimmed:
                kept = self.top.trim(tau)
                if self.kind == "outliers":
                    kept.sub_(self.outliers.trim(tau))
                tau.copy_(kept)
        elif self.kind == "random":
            tau.mul_(ops.random_mask(tau, self.density, self.generator))
        elif self.kind == "della":
            probability = ops.della_keep_probability(tau.view(rows, -1), self.density, self.epsilon).view(-1)
            tau.mul_(ops.random_mask(tau, probability, self.generator))
            if self.rescale:
                tau.div_(probability)
            return tau
        if self.rescale:
            tau.div_(self.density)
        return tau


# Task vectors of a tensor up to this size (all experts together) are computed once and
# kept; bigger ones (embeddings) are recomputed chunk by chunk to bound memory.
RESIDENT_BYTES = 256 * 2**20


def generalized_task_arithmetic(
    base, experts, expert_params, params, generator, name, *, sparsifier: str | None, consensus: str | None
) -> torch.Tensor:
    """Works on the flattened tensor in cache-sized chunks; memory stays at the inputs
    plus the task vectors (or, for tensors above RESIDENT_BYTES, a few chunk buffers)."""
    device = base.device
    flat_base = base.reshape(-1)
    flats = [x.reshape(-1) for x in experts]
    n, k = flat_base.numel(), len(experts)
    sparsifiers = [_Sparsifier(sparsifier, p, params.get("rescale", False), n, generator) for p in expert_params]
    resident = None
    if k * n * 4 <= RESIDENT_BYTES:
        resident = ops.SCRATCH.get("gta.resident", (k, n), torch.float32, device)
        ops.task_vectors(flat_base, flats, out=resident)  # [K, N]
        for i in range(k):
            sparsifiers[i].trim_whole(resident[i])
    else:
        for i in range(k):
            sparsifiers[i].select_streamed(n, lambda sl, i=i: ops.f32(flats[i][sl]).sub_(flat_base[sl]).abs_())

    weights = [p["weight"] for p in expert_params]
    w = torch.tensor(weights, dtype=torch.float32, device=device).unsqueeze(1)  # [K, 1]
    # DELLA ranks within rows, so its chunks hold whole rows; 1-D tensors are one row.
    row = (base.shape[-1] if base.dim() >= 2 else n) if sparsifier == "della" else 1
    chunks = ops.chunk_ranges(n, align=row)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for s, e in chunks:
        b = ops.f32(flat_base[s:e])
        if resident is not None:
            deltas = resident[:, s:e]  # [K, chunk], a view we may overwrite
        else:
            deltas = ops.SCRATCH.get("gta.chunk", (k, e - s), torch.float32, device)  # [K, chunk]
            for i in range(k):
                deltas[i].copy_(flats[i][s:e]).sub_(b)
        for i in range(k):
            sparsifiers[i].apply(deltas[i], (e - s) // row)
            if weights[i] != 1:
                deltas[i].mul_(weights[i])

        if consensus is not None:
            votes = deltas.sum(dim=0) if consensus == "sum" else deltas.sign().sum(dim=0)
            # +1 where votes >= 0 (an exact cancellation sums to +0.0); -0.0 only
            # arises when every entry is zero, and zeros never agree anyway
            elected = torch.ones_like(votes).copysign_(votes)
            agreeing = deltas.mul_(elected).relu_()  # |entries| agreeing with the elected sign
            mixed = agreeing.sum(dim=0).mul_(elected)
            if params["normalize"]:
                if len(set(weights)) == 1:  # equal weights: count the contributors
                    divisor = agreeing.sign_().sum(dim=0).mul_(weights[0])
                else:
                    divisor = (agreeing.sign_() * w).sum(dim=0)  # sum of weights that contributed
                mixed.div_(divisor.add_(divisor == 0))  # nothing contributed: divide by 1
        else:
            mixed = deltas.sum(dim=0)
            if params["normalize"]:
                total = sum(weights)
                mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        out[s:e] = b.add_(mixed, alpha=params["lambda"])
    return out.reshape(base.shape)


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
