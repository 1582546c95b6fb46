"""Tensor operations shared by merge methods: task vectors, sparsifiers, sign consensus.

Every method builds on these; none re-implements them. All work in float32 on
whatever device the inputs live on. Masks are boolean tensors of the input's shape.
"""

from __future__ import annotations

import hashlib
import re
import math

import torch
import torch.nn.functional as F


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


def chunk_ranges(n: int, align: int = 1, chunk: int | None = None) -> list[tuple[int, int]]:
    """[start, end) ranges covering 0..n; sizes are multiples of `align` (e.g. a row)."""
    chunk = chunk or CHUNK_ELEMENTS
    size = max(align, (chunk // align) * align)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# -- magnitude top-k ------------------------------------------------------------------
# Exact top-k without sorting, in linear time. A strided sample brackets the k-th
# largest score; one pass counts the scores above the bracket and collects the few
# inside it (about 1%), among which the threshold is selected. Should the bracket miss
# (a pathological distribution), a two-pass radix select over the scores' bit patterns
# finds it exactly (for non-negative float32 the integer order of the bits is the
# numeric order): a histogram of the high 16 bits finds the bucket holding the
# threshold, a histogram of the low 16 bits of that bucket's members the threshold
# itself. Ties at the threshold go to the lowest flat indices, so the result is
# deterministic and top_k(a) is inside top_k(b) for a <= b (breadcrumbs relies on that).
_HIGH = 1 << 15  # buckets of the high 16 bits (the sign bit of a score is 0)
_LOW = 1 << 16


class TopK:
    """Membership in the top k of |x| for a tensor x that is streamed in flat order."""

    def __init__(self, threshold: float, ties_left: int, equal_left: int | None = None):
        self.threshold = threshold  # the k-th largest |x|
        self.ties_left = ties_left  # entries with |x| equal to it that are still in the top k
        # entries equal to it not yet seen (None: unknown); when every remaining one is
        # kept, one comparison per entry decides membership
        self.equal_left = equal_left

    def _all_ties_kept(self) -> bool:
        return self.equal_left is not None and self.ties_left >= self.equal_left

    def trim(self, x: torch.Tensor) -> torch.Tensor:
        """The next chunk of x with entries outside the top k zeroed (a new tensor)."""
        if self.threshold == float("inf"):
            return torch.zeros_like(x)
        if self.ties_left <= 0 or self.threshold == 0:  # kept zeros are zeros anyway
            return F.hardshrink(x, self.threshold)  # keeps |x| > threshold in one fused pass
        if self._all_ties_kept():
            return F.hardshrink(x, _below(self.threshold))  # keeps |x| >= threshold
        out = F.hardshrink(x, self.threshold)
        tied = torch.nonzero(x.reshape(-1).abs() == self.threshold).squeeze(1)
        self._take(tied)
        keep = tied[: self._taken]
        out.view(-1)[keep] = x.reshape(-1)[keep]
        return out

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean membership for the next chunk, given its scores (|x|, or any score)."""
        if self.ties_left <= 0:
            return scores > self.threshold
        if self._all_ties_kept():
            return scores >= self.threshold
        m = scores > self.threshold
        tied = torch.nonzero(scores.reshape(-1) == self.threshold).squeeze(1)
        self._take(tied)
        m.view(-1)[tied[: self._taken]] = True
        return m

    def _take(self, tied: torch.Tensor) -> None:
        self._taken = min(self.ties_left, tied.numel())
        self.ties_left -= self._taken
        if self.equal_left is not None:
            self.equal_left -= tied.numel()


def _top_of(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
    """In a histogram over ordered bins, the bin holding the k-th largest entry (k >= 1):
    (bin, entries in higher bins, entries in it)."""
    from_top = hist.flip(0).cumsum(0)  # entries in the top j + 1 bins
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)))
    above = int(from_top[j - 1]) if j > 0 else 0
    b = hist.numel() - 1 - j
    return b, above, int(hist[b])


def _radix_select(chunks, k: int) -> TopK:
    """The k-th largest of non-negative finite float32 scores, given `chunks()`: an
    iterable over them in flat order (called twice: once per 16 bits)."""
    high = None
    for sc in chunks():
        h = torch.bincount(sc.reshape(-1).view(torch.int32) >> 16, minlength=_HIGH)
        high = h if high is None else high.add_(h)
    bucket, above, _ = _top_of(high, k)
    low = None
    for sc in chunks():
        # low 16 bits of the bucket's members in bins 1.._LOW; bin 0 below it, _LOW + 1 above
        key = torch.sub(sc.reshape(-1).view(torch.int32), (bucket << 16) - 1).clamp_(0, _LOW + 1)
        h = torch.bincount(key, minlength=_LOW + 2)
        low = h if low is None else low.add_(h)
    low_bits, above_low, equal = _top_of(low[1:_LOW + 1], k - above)
    threshold = float(torch.tensor([(bucket << 16) | low_bits], dtype=torch.int32).view(torch.float32))
    return TopK(threshold, k - above - above_low, equal)


def _sample_step(n: int) -> int:
    """Stride of the sample that locates the bracket. Selecting in the sample costs
    ~m, settling the bracket's ~n/sqrt(m) candidates costs that much: m ~ n^(2/3)."""
    m = min(max(int(2 * n ** (2 / 3)), 4096), 1 << 18)
    return max(1, n // m)


def _bracket(sample: torch.Tensor, n: int, k: int) -> tuple[float, float]:
    """Values (lo, hi) that very probably enclose the k-th largest of n scores, from a
    strided sample of them; six binomial standard deviations of slack make a miss
    (handled by the radix select) very rare."""
    m, q = sample.numel(), k / n
    slack = 6 * math.sqrt(m * q * (1 - q)) + 8
    i_hi, i_lo = math.floor(q * m - slack), math.ceil(q * m + slack)
    hi = float(torch.kthvalue(sample, m - i_hi).values) if i_hi >= 0 else float("inf")
    lo = float(torch.kthvalue(sample, m - i_lo).values) if i_lo < m else float("-inf")
    return lo, hi


def _in_pool(pool: torch.Tensor, above: int, k: int) -> TopK:
    """The threshold is in `pool`, which holds every score equal to it; `above` scores
    (not in it) are larger than all of it. The pool is small: select in it directly."""
    r = k - above  # rank of the threshold inside the pool, from the top
    threshold = float(torch.kthvalue(pool, pool.numel() - r + 1).values)
    greater = above + int(torch.count_nonzero(pool > threshold))
    return TopK(threshold, k - greater, int(torch.count_nonzero(pool == threshold)))


_DIRECT = 1 << 16  # below this many scores, select over all of them at once


def select_top_k(scores_of, n: int, k: int) -> TopK:
    """Find the k-th largest of n scores; `scores_of(slice)` computes scores for a slice.

    The slice may be strided (for the sample). Scores must be non-negative finite
    float32 (|x|, a variance); the returned tensor need only stay valid until the next call.
    """
    if k <= 0:
        return TopK(float("inf"), 0)
    if k >= n:
        return TopK(float("-inf"), 0)
    if n <= _DIRECT:
        return _radix_select(lambda: (scores_of(slice(0, n)),), k)
    lo, hi = _bracket(scores_of(slice(0, n, _sample_step(n))), n, k)
    above, candidates = 0, []
    for s, e in chunk_ranges(n):
        sc = scores_of(slice(s, e))
        above += int(torch.count_nonzero(sc > hi))
        candidates.append(sc[(sc >= lo) & (sc <= hi)])
    pool = torch.cat(candidates)
    if not 0 < k - above <= pool.numel():  # the bracket missed: radix over everything
        return _radix_select(lambda: (scores_of(slice(s, e)) for s, e in chunk_ranges(n)), k)
    return _in_pool(pool, above, k)


def _below(v: float) -> float:
    """The float32 just below v, so that hardshrink's strict |x| > t keeps |x| >= v."""
    return float(torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(-math.inf)))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest `scores` (>= 0), exactly k (ties towards lower flat index)."""
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
def task_vectors(base: torch.Tensor, experts: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Stacked task vectors [K, ...] in float32 (written into `out` if given)."""
    if out is None:
        out = torch.empty((len(experts), *base.shape), dtype=torch.float32, device=base.device)
    for i, x in enumerate(experts):
        out[i].copy_(x).sub_(base)  # converts to float32 on the copy, no temporary
    return out


class Scratch:
    """Reusable scratch buffers, one per name.

    A fresh allocation above glibc's mmap threshold (32 MB at most) is new memory that
    page-faults on first touch, which costs more than the arithmetic done in it. A
    buffer handed out here is valid until the next `get` with the same name; never
    return it from a merge method.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (name, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


SCRATCH = Scratch()


def orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns/rows (polar factor): U V^T of m's SVD."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


_LAYER = re.compile(r"(^|\.)(layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Transformer block index in a tensor name ("model.layers.3.mlp..." -> 3), else None."""
    match = _LAYER.search(name)
    return int(match.group(3)) if match else None


def with_layer_index(name: str, index: int) -> str:
    """`name` with its block index replaced ("model.layers.3.x" -> "model.layers.<index>.x")."""
    return _LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}.{index}.", name, count=1)


# -- top-k as a rule one block can apply alone ---------------------------------------
# A tensor too big to hold (or to process at once) is trimmed block by block. What a
# block needs from the whole tensor is two numbers: the k-th largest score and the flat
# index up to which entries equal to it are kept (ties go to the lowest indices, as in
# select_top_k). They are found in one pass over the blocks when a strided sample of the
# scores brackets the threshold, else in two: a histogram of the scores' high 16 bits
# (for non-negative float32, integer order of the bits is numeric order) finds the
# bucket holding the threshold, and a second pass collects that bucket's members.
_MIN_POSITIVE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23  # smallest subnormal


class Cut:
    """The top k of n scores: entry j is in when score_j > threshold, or score_j ==
    threshold and j < cutoff."""

    def __init__(self, threshold: float, cutoff: int = 0):
        self.threshold = threshold
        self.cutoff = cutoff
        self._below = _below(threshold) if 0 < threshold < math.inf else threshold

    def trim_(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Zero in place the entries of the flat block x (flat indices start...) outside
        the top k by |x|; x's scores must be |x|."""
        t = self.threshold
        if t == math.inf:
            return x.zero_()
        if t == -math.inf:
            return x
        if t == 0 or self.cutoff <= start:  # kept zeros are zeros anyway
            return torch.hardshrink(x, t, out=x)  # keeps |x| > t
        if self.cutoff >= start + x.numel():
            return torch.hardshrink(x, self._below, out=x)  # keeps |x| >= t
        c = self.cutoff - start
        torch.hardshrink(x[:c], self._below, out=x[:c])
        torch.hardshrink(x[c:], t, out=x[c:])
        return x


def cut_trivial(n: int, k: int) -> Cut | None:
    """The cut of k <= 0 (nothing kept) or k >= n (everything), else None."""
    if k <= 0:
        return Cut(math.inf)
    if k >= n:
        return Cut(-math.inf)
    return None


def bracket_of_sample(sample: torch.Tensor, n: int, k: int) -> tuple[float, float]:
    """(lo, hi) very probably enclosing the k-th largest of n scores (see _bracket)."""
    return _bracket(sample, n, k)


def sample_runs(n: int, runs: int = 256, run: int = 1024) -> list[tuple[int, int]]:
    """Evenly spaced ranges sampling a tensor on disk with few reads."""
    if n <= runs * run:
        return [(0, n)]
    return [(i * n // runs, i * n // runs + run) for i in range(runs)]


def magnitude_samples(sources, experts: list[int]) -> dict[int, torch.Tensor]:
    """A sample of |tau_i| = |expert_i - base| (float32) for each expert i, from the
    flat sources (base first): strided in memory, evenly spaced runs of a tensor on disk."""
    n = sources[0].numel
    if all(getattr(s, "in_memory", False) for s in sources):
        step = _sample_step(n)
        base = sources[0].flat[::step]
        return {i: f32(sources[1 + i].flat[::step]).sub_(base).abs_() for i in experts}
    runs = sample_runs(n)
    base = torch.cat([sources[0].read(s, e) for s, e in runs]).float()
    return {i: torch.cat([sources[1 + i].read(s, e) for s, e in runs]).float().sub_(base).abs_() for i in experts}


def bucket_bracket(hist: torch.Tensor, k: int) -> tuple[float, float]:
    """(lo, hi): the range of the high-16-bit bucket holding the k-th largest score."""
    bucket, _, _ = _top_of(hist, k)
    bits = torch.tensor([bucket << 16, (bucket << 16) | 0xFFFF], dtype=torch.int32)
    lo, hi = bits.view(torch.float32).tolist()
    return lo, hi


def high_bits(scores: torch.Tensor) -> torch.Tensor:
    """Histogram bins (high 16 bits) of non-negative float32 scores."""
    return scores.reshape(-1).view(torch.int32) >> 16


class BandCount:
    """What one pass over the blocks gathers for one cut, given a bracket (lo, hi):
    how many scores are above hi, and the positive scores inside [lo, hi] with their
    flat indices (in flat order when blocks are added in flat order)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = max(lo, _MIN_POSITIVE), hi
        self.open_below = lo <= 0  # the band holds every positive score up to hi
        self._lo_below = _below(self.lo)  # hardshrink keeps |x| > its bound
        self.above = 0
        self._above = self._band = None  # block buffers
        self.values: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, start: int) -> None:
        """Count one block of scores (flat offset `start`). Float operations only:
        comparisons that make boolean tensors are several times slower on CPU."""
        m = scores.numel()
        if self._above is None or self._above.numel() < m:
            self._above = torch.empty(m, dtype=torch.float32, device=scores.device)
            self._band = torch.empty(m, dtype=torch.float32, device=scores.device)
        above = torch.hardshrink(scores, self.hi, out=self._above[:m]) if self.hi != math.inf \
            else self._above[:m].zero_()
        # scores inside [lo, hi], zero elsewhere (lo > 0, so a zero is never a member)
        band = torch.hardshrink(scores, self._lo_below, out=self._band[:m]).sub_(above)
        self.above += int(above.sign_().sum())
        # non-zero floats are non-zero bit patterns; nonzero is faster on integers
        index = torch.nonzero(band.view(torch.int32)).squeeze(1)
        self.values.append(band[index])
        self.index.append(index.add_(start))

    def extend(self, other: "BandCount") -> None:
        """Append the counts of the blocks that follow (another worker's range)."""
        self.above += other.above
        self.values += other.values
        self.index += other.index

    def cut(self, k: int) -> Cut | None:
        """The cut of the top k, or None when the bracket missed the threshold."""
        pool = torch.cat(self.values) if self.values else torch.empty(0)
        r = k - self.above  # rank of the threshold inside the band, from the top
        if r <= 0:
            return None
        if r > pool.numel():
            # every positive score is in the top k: the threshold is zero
            return Cut(0.0) if self.open_below else None
        threshold = float(torch.kthvalue(pool, pool.numel() - r + 1).values)
        ties = r - int(torch.count_nonzero(pool > threshold))  # >= 1 entries equal to it kept
        tied = torch.cat(self.index)[pool == threshold]
        return Cut(threshold, int(tied[ties - 1]) + 1)


class TensorSource:
    """A tensor in memory, read by flat ranges (the interface of a tensor on disk too)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.flat = tensor.reshape(-1)
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.numel = self.flat.numel()
        self.in_memory = True

    def read(self, start: int, end: int) -> torch.Tensor:
        return self.flat[start:end]


def as_source(x) -> "TensorSource":
    return TensorSource(x) if isinstance(x, torch.Tensor) else x


def lanes(n: int, workers: int, align: int) -> list[tuple[int, int]]:
    """Split 0..n into at most `workers` contiguous ranges of whole `align` blocks."""
    blocks = -(-n // align)
    per = -(-blocks // max(1, workers))
    return [(s * align, min((s + per) * align, n)) for s in range(0, blocks, per)] or [(0, 0)]
