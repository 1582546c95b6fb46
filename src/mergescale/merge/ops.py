"""Tensor operations shared by merge methods: task vectors, sparsifiers, sign consensus.

Every method builds on these; none re-implements them. All work in float32 on
whatever device the inputs live on. Masks are boolean tensors of the input's shape.
"""

from __future__ import annotations

import hashlib
import re
import math

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


# -- chunking ---------------------------------------------------------------------------
# 1M elements: a 4 MB float32 buffer per expert stays in cache, and a huge tensor (an
# embedding) never needs more than a few such buffers on top of its inputs.
CHUNK_ELEMENTS = 1 << 20


def chunk_ranges(n: int, align: int = 1, chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """[start, end) ranges covering 0..n; sizes are multiples of `align` (e.g. a row)."""
    size = max(align, (chunk // align) * align)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# -- magnitude top-k ------------------------------------------------------------------
# Exact top-k without sorting: the k-th largest score is found by selection among a
# small bracket of candidates, then membership is decided chunk by chunk in flat order.
# Ties at the threshold go to the lowest flat indices, so the result is deterministic
# and top_k(a) is inside top_k(b) for a <= b (breadcrumbs relies on that).
_SAMPLE = 1 << 16  # strided sample that locates the bracket
_DIRECT = 1 << 16  # below this many elements, select directly


class TopK:
    """Membership in the top k of a score tensor that is streamed in flat order."""

    def __init__(self, threshold: float, ties_left: int):
        self.threshold = threshold  # the k-th largest score
        self.ties_left = ties_left  # elements equal to it that are still in the top k

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Mask for the next chunk of scores (chunks must come in flat order)."""
        m = scores > self.threshold
        if self.ties_left > 0:
            eq = scores == self.threshold
            n_eq = int(torch.count_nonzero(eq))
            if n_eq <= self.ties_left:
                m |= eq
                self.ties_left -= n_eq
            elif n_eq:
                m.view(-1)[torch.nonzero(eq.view(-1)).squeeze(1)[: self.ties_left]] = True
                self.ties_left = 0
        return m


def select_top_k(scores_of, n: int, k: int, device: torch.device | str = "cpu") -> TopK:
    """Find the k-th largest of n scores; `scores_of(slice)` computes scores for a slice.

    The slice may be strided (for the sample). Scores must be finite float32.
    """
    if k <= 0:
        return TopK(float("inf"), 0)
    if k >= n:
        return TopK(float("-inf"), 0)
    if n <= _DIRECT:
        return _exact(scores_of(slice(0, n)), 0, k)
    # A strided sample brackets the k-th largest value; six binomial standard
    # deviations of slack make a miss (handled by the exact fallback) very rare.
    step = n // _SAMPLE
    sample = scores_of(slice(0, step * _SAMPLE, step))
    m, q = sample.numel(), k / n
    slack = 6 * math.sqrt(m * q * (1 - q)) + 8
    i_hi, i_lo = math.floor(q * m - slack), math.ceil(q * m + slack)
    hi = float(torch.kthvalue(sample, m - i_hi).values) if i_hi >= 0 else float("inf")
    lo = float(torch.kthvalue(sample, m - i_lo).values) if i_lo < m else float("-inf")
    above, candidates = 0, []
    for s, e in chunk_ranges(n):
        sc = scores_of(slice(s, e))
        above += int(torch.count_nonzero(sc > hi))
        candidates.append(sc[(sc >= lo) & (sc <= hi)])
    pool = torch.cat(candidates)
    if not 0 < k - above <= pool.numel():  # the bracket missed: select over everything
        return _exact(torch.cat([scores_of(slice(s, e)) for s, e in chunk_ranges(n)]), 0, k)
    return _exact(pool, above, k)


def _exact(pool: torch.Tensor, above: int, k: int) -> TopK:
    """Threshold from `pool`, which holds every score <= the k-th largest's neighbourhood
    upper bound, `above` scores being larger than everything in it."""
    r = k - above  # rank of the threshold inside the pool, from the top
    threshold = float(torch.kthvalue(pool, pool.numel() - r + 1).values)
    greater = above + int(torch.count_nonzero(pool > threshold))
    return TopK(threshold, k - greater)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest `scores`, exactly k (ties broken towards lower flat index)."""
    flat = scores.reshape(-1)
    sel = select_top_k(lambda sl: flat[sl], flat.numel(), k)
    return sel.mask(flat).reshape(scores.shape)


def magnitude_k(n: int, density: float) -> int:
    """TIES keeps int(density * n) entries, and at least one (mergekit's rule)."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top `density` fraction by |x| (at least one element)."""
    return top_k_mask(x.abs(), magnitude_k(x.numel(), density))


def outlier_band(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs: (n_top, n_keep): drop the n_top largest, keep the next n_keep.

    When gamma + density > 1 the outlier cut shrinks so that `density` is kept.
    """
    keep = n if density >= 1 else int(density * n)
    return (min(int(gamma * n), n - keep) if density < 1 else 0), keep


def outlier_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` fraction by |x| (outliers) and the
    smallest values, keeping `density` of the elements."""
    n_top, keep = outlier_band(x.numel(), density, gamma)
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


# -- task vectors and geometry ------------------------------------------------------------
def task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """Stacked task vectors [K, ...] in float32."""
    base32 = base.to(torch.float32)
    out = torch.empty((len(experts), *base.shape), dtype=torch.float32, device=base.device)
    for i, x in enumerate(experts):
        torch.sub(x.to(torch.float32), base32, out=out[i])
    return out


def orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns/rows (polar factor): U V^T of m's SVD."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Transformer block index in a tensor name ("model.layers.3.mlp..." -> 3), else None."""
    match = _LAYER.search(f".{name}")
    return int(match.group(1)) if match else None
