"""Tensor operations shared by merge methods: task vectors, sparsifiers, sign consensus.

Every method builds on these; none re-implements them. All work in float32 on
whatever device the inputs live on. Masks are boolean tensors of the input's shape.
"""

from __future__ import annotations

import hashlib

import torch


def f32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy the caller may modify in place (inputs are never mutated)."""
    return t.to(torch.float32, copy=True)


def task_vector(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tau = expert - base in float32 (Ilharco et al. 2023)."""
    return f32(expert).sub_(base.to(torch.float32))


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, tensor name), independent of iteration order."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- magnitude top-k ------------------------------------------------------------------
def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest `scores`, exactly k (ties broken towards lower flat index).

    Uses a k-th value selection (linear time) instead of a full sort; the tie rule
    makes the result deterministic and nested (top_k(a) is inside top_k(b) for a <= b).
    """
    n = scores.numel()
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    # k-th largest == (n - k + 1)-th smallest
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[tied] = True
    return mask.reshape(scores.shape)


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top `density` fraction by |x| (at least one element)."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    k = max(1, int(density * x.numel()))
    return top_k_mask(x.abs(), k)


def outlier_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` fraction by |x| (outliers) and the
    smallest values, keeping `density` of the elements.

    When gamma + density > 1 the outlier cut shrinks so that `density` is kept.
    """
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    n = x.numel()
    keep = int(density * n)
    n_top = min(int(gamma * n), n - keep)
    scores = x.abs()
    return top_k_mask(scores, n_top + keep) & ~top_k_mask(scores, n_top)


# -- random drops -----------------------------------------------------------------------
def random_mask(x: torch.Tensor, density: float | torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each element independently with probability `density` (scalar or
    per-element tensor)."""
    if isinstance(density, float) and density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return u < density


def della_keep_probability(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: per-row keep probabilities rising linearly with magnitude rank,
    from density - epsilon (smallest) to density + epsilon (largest).

    1-D tensors are treated as one row.
    """
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)  # [R, C]
    ncols = rows.shape[1]
    if ncols < 2:
        return torch.full_like(x, density, dtype=torch.float32)
    # rank 0 = smallest |x| in the row; double argsort turns order into ranks
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)  # [R, C]
    probs = (density - epsilon) + ranks / (ncols - 1) * (2 * epsilon)
    return probs.reshape(x.shape)


# -- sign consensus (TIES "elect") -------------------------------------------------------
def elect_sign(stacked: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Majority sign per element over dim 0 of [K, ...]: +1 or -1 (ties go to +1).

    "sum": sign of the summed values (TIES paper, mergekit's default);
    "count": sign held by more experts.
    """
    if method == "sum":
        votes = stacked.sum(dim=0)
    elif method == "count":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown sign consensus {method!r}")
    return torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)


def agrees_with(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mask [K, ...] of entries whose sign equals the elected sign (zeros never agree)."""
    return stacked.sign() == sign
