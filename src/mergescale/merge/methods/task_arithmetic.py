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

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from mergescale.merge import compiled, ops
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
    """One expert's sparsifier, applied block by block.

    Magnitude kinds need the whole task vector to rank it: their cuts (threshold and
    tie cutoff, ops.Cut) are found first, for every expert in one pass (`ks`,
    `set_cuts`); each block is then trimmed on its own. Random kinds draw per block.
    """

    def __init__(self, kind: str | None, p: dict, rescale: bool, n: int, generator):
        self.kind = None if (kind is None or p["density"] >= 1) else kind
        self.density = p.get("density", 1.0)
        self.rescale = rescale
        self.generator = generator
        self.ks: list[int] = []
        if self.kind == "magnitude":
            self.ks = [ops.magnitude_k(n, self.density)]
        elif self.kind == "outliers":
            n_top, keep = ops.outlier_band(n, self.density, p["gamma"])
            self.ks = [n_top + keep, n_top]  # the band is the big set minus the outliers
        elif self.kind == "della":
            self.epsilon = p["epsilon"]
            if self.density - self.epsilon <= 0 or self.density + self.epsilon > 1:
                raise MergeInputError(
                    f"density={self.density} and epsilon={self.epsilon}: density - epsilon must be > 0 "
                    "and density + epsilon <= 1"
                )

    def set_cuts(self, cuts: list[ops.Cut]) -> None:
        self.cuts = cuts

    def apply(self, tau: torch.Tensor, start: int, rows: int, spare: torch.Tensor) -> torch.Tensor:
        """Sparsify one flat block in place (`start`: its flat offset; `rows`: how many
        rows it holds, for DELLA; `spare`: a buffer of its size for the outlier band)."""
        if self.kind is None:
            return tau
        if self.kind == "magnitude":
            self.cuts[0].trim_(tau, start)
        elif self.kind == "outliers":
            outliers = self.cuts[1].trim_(spare.copy_(tau), start)
            self.cuts[0].trim_(tau, start).sub_(outliers)
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


# Elements per block: a block's buffers (the task vectors of every expert and a few
# more) stay in a core's L2 cache while every element-wise step runs on them, and
# element-wise torch operations of at most 32768 elements run on the calling thread.
BLOCK_ELEMENTS = 1 << 15
# Inputs read from disk (tensors too big to hold, see mergescale.merge.engine) are read
# this many elements at a time, per input and worker.
READ_ELEMENTS = 1 << 22


class _Blocks:
    """Walks the flat inputs (base first) in blocks, on `workers` threads each taking a
    contiguous range: in memory, blocks are views; from disk, a range is read
    READ_ELEMENTS at a time. Randomised sparsifiers draw in order: one worker, and
    blocks of ops.CHUNK_ELEMENTS whole rows."""

    def __init__(self, sources, n: int, block: int, workers: int):
        self.sources, self.n, self.block = sources, n, block
        self.in_memory = all(getattr(s, "in_memory", False) for s in sources)
        self.device = sources[0].flat.device if self.in_memory else torch.device("cpu")
        self.workers = workers

    def walk(self, s0: int, e0: int):
        """(start, end, [flat view of each input]) for the blocks of [s0, e0)."""
        step = self.block if self.in_memory else max(self.block, (READ_ELEMENTS // self.block) * self.block)
        for cs in range(s0, e0, step):
            ce = min(cs + step, e0)
            chunk = [src.read(cs, ce) for src in self.sources]
            for s in range(cs, ce, self.block):
                e = min(s + self.block, ce)
                yield s, e, [c[s - cs:e - cs] for c in chunk]

    def map(self, work, s0: int = 0, e0: int | None = None):
        """work(start, end) over contiguous lanes of [s0, e0), one per worker; the
        results in lane (flat) order."""
        e0 = self.n if e0 is None else e0
        lanes = [(s0 + s, s0 + e) for s, e in ops.lanes(e0 - s0, self.workers, self.block)]
        if len(lanes) == 1:
            return [work(*lanes[0])]
        with ThreadPoolExecutor(len(lanes), thread_name_prefix="merge-block") as pool:
            return list(pool.map(lambda lane: work(*lane), lanes))


def _find_cuts(blocks: _Blocks, sparsifiers: list[_Sparsifier]) -> None:
    """Every magnitude sparsifier's cuts, from one pass over the blocks (two more for
    any whose bracket from a sample missed)."""
    n = blocks.n
    wants = [(i, k) for i, sp in enumerate(sparsifiers) for k in sp.ks]
    cuts: list[ops.Cut | None] = [ops.cut_trivial(n, k) for _, k in wants]
    brackets: list[tuple[float, float] | None] = [None] * len(wants)
    # a sample of each task vector's magnitudes brackets its threshold (a miss costs a
    # histogram pass)
    samples = ops.magnitude_samples(blocks.sources, sorted({i for i, _ in wants}))
    brackets = [None if cuts[j] else ops.bracket_of_sample(samples[i], n, k) for j, (i, k) in enumerate(wants)]
    experts = sorted({i for i, _ in wants})

    def scores(s0, e0):
        """|tau_i| of every expert that has a cut to find, block by block."""
        bf = torch.empty(blocks.block, dtype=torch.float32, device=blocks.device)
        bufs = {i: torch.empty(blocks.block, dtype=torch.float32, device=blocks.device) for i in experts}
        for s, e, flats in blocks.walk(s0, e0):
            b = bf[: e - s].copy_(flats[0])
            yield s, {i: torch.sub(bufs[i][: e - s].copy_(flats[1 + i]), b, out=bufs[i][: e - s]).abs_()
                      for i in experts}

    for _ in range(2):
        todo = [j for j in range(len(wants)) if cuts[j] is None]
        if not todo:
            break
        missing = [j for j in todo if brackets[j] is None]
        if missing:  # histograms of the high bits, bucket by bucket
            def histogram(s0, e0):
                keys = {j: torch.empty(min(READ_ELEMENTS, max(e0 - s0, 1)), dtype=torch.int32) for j in missing}
                hist = {j: torch.zeros(1 << 15, dtype=torch.int64) for j in missing}
                filled = 0
                for s, sc in scores(s0, e0):
                    m = next(iter(sc.values())).numel()
                    if filled + m > keys[missing[0]].numel():
                        for j in missing:
                            hist[j] += torch.bincount(keys[j][:filled], minlength=1 << 15)
                        filled = 0
                    for j in missing:
                        torch.bitwise_right_shift(sc[wants[j][0]].view(torch.int32), 16, out=keys[j][filled:filled + m])
                    filled += m
                for j in missing:
                    hist[j] += torch.bincount(keys[j][:filled], minlength=1 << 15)
                return hist

            totals = blocks.map(histogram)
            for j in missing:
                brackets[j] = ops.bucket_bracket(sum(h[j] for h in totals), wants[j][1])

        def band(s0, e0):
            counts = {j: ops.BandCount(*brackets[j]) for j in todo}
            for s, sc in scores(s0, e0):
                for j in todo:
                    counts[j].add(sc[wants[j][0]], s)
            return counts

        parts = blocks.map(band)
        for j in todo:
            count = parts[0][j]
            for later in parts[1:]:
                count.extend(later[j])
            cuts[j] = count.cut(wants[j][1])
            if cuts[j] is None:
                brackets[j] = None  # the sample's bracket missed: histogram next round
    if any(c is None for c in cuts):  # cannot happen: a bucket always holds its threshold
        raise RuntimeError("top-k threshold not found")
    for i, sp in enumerate(sparsifiers):
        sp.set_cuts([cuts[j] for j, (e, _) in enumerate(wants) if e == i])


def gta_blocks(
    base, experts, expert_params, params, generator, name, *, sparsifier: str | None, consensus: str | None,
    out: torch.Tensor | None = None,
):
    """Generalised task arithmetic block by block: yields (start, end, merged float32
    piece) in flat order (a piece is valid until the next is made), or fills `out`
    (flat float32) and yields nothing.

    base, experts: tensors, or sources read by flat ranges (ops.TensorSource, or a
    tensor on disk: mergescale.merge.safetensors_io.FileSource). Every step of a block
    (to float32, task vector, trim, weight, sign election, disjoint mean, add to the
    base) runs while the block is in cache."""
    sources = [ops.as_source(base)] + [ops.as_source(x) for x in experts]
    shape, n = sources[0].shape, sources[0].numel
    sparsifiers = [_Sparsifier(sparsifier, p, params.get("rescale", False), n, generator) for p in expert_params]
    threads = torch.get_num_threads()
    device = sources[0].flat.device if getattr(sources[0], "in_memory", False) else torch.device("cpu")
    if compiled.compiled_merge_applies(sparsifiers, consensus, sources, device):
        weights = [p["weight"] for p in expert_params]
        yield from compiled.merge_ranges(sources, sparsifiers, weights, params, consensus, threads, READ_ELEMENTS,
                                         out)
        return
    randomised = any(sp.kind in ("random", "della") for sp in sparsifiers)
    # DELLA ranks within rows, so its blocks hold whole rows; 1-D tensors are one row.
    row = (shape[-1] if len(shape) >= 2 else n) if sparsifier == "della" else 1
    blocks = _Blocks(sources, n, BLOCK_ELEMENTS, threads)
    if randomised or blocks.device.type != "cpu":
        # draws follow the block order (one worker, blocks of whole rows); a GPU wants
        # big blocks, on one host thread
        blocks = _Blocks(sources, n, max(row, (ops.CHUNK_ELEMENTS // row) * row), 1)
    elif threads > 1:
        # The workers are the threads: torch's own would only wake (and spin) for the
        # few operations on whole tensors, which costs more than they save on a busy CPU.
        torch.set_num_threads(1)
    try:
        yield from _merge_blocks(blocks, sources, sparsifiers, expert_params, params, consensus, row, out)
    finally:
        torch.set_num_threads(threads)


def _merge_blocks(blocks, sources, sparsifiers, expert_params, params, consensus, row, out):
    """gta_blocks once its blocks are planned."""
    n, k = blocks.n, len(sources) - 1
    if any(sp.ks for sp in sparsifiers):
        _find_cuts(blocks, sparsifiers)

    weights = [p["weight"] for p in expert_params]
    equal_weights = len(set(weights)) == 1
    device = blocks.device
    lam, normalize = params["lambda"], params["normalize"]
    total = sum(weights)

    def merge(s0, e0, dest, offset):
        size = blocks.block
        bf = torch.empty(size, dtype=torch.float32, device=device)
        deltas = torch.empty(k, size, dtype=torch.float32, device=device)
        spare = torch.empty(size, dtype=torch.float32, device=device)
        votes, elected, mixed = (torch.empty(size, dtype=torch.float32, device=device) for _ in range(3))
        ones = torch.ones(size, dtype=torch.float32, device=device)
        zero = torch.empty(size, dtype=torch.bool, device=device)
        for s, e, flats in blocks.walk(s0, e0):
            m = e - s
            b = bf[:m].copy_(flats[0])
            d = deltas[:, :m]
            for i in range(k):
                torch.sub(d[i].copy_(flats[1 + i]), b, out=d[i])
                sparsifiers[i].apply(d[i], s, m // row, spare[:m])
                if weights[i] != 1:
                    d[i].mul_(weights[i])
            v = votes[:m]
            if consensus == "count":  # sign held by more experts
                torch.sign(d[0], out=v)
                for i in range(1, k):
                    v.add_(torch.sign(d[i]))
            else:
                _sum_rows(d, v)
            if consensus is not None:
                # +1 where votes >= 0 (an exact cancellation sums to +0.0); -0.0 only
                # arises when every entry is zero, and zeros never agree anyway
                el = torch.copysign(ones[:m], v, out=elected[:m])
                # Row by row from here on: an operation on one block of every expert
                # would be split over threads, and each worker thread is one already.
                for i in range(k):
                    d[i].mul_(el).relu_()  # |entries| agreeing with the elected sign
                mx = _sum_rows(d, mixed[:m]).mul_(el)
                if normalize:  # divide by the sum of the weights that contributed
                    for i in range(k):
                        d[i].sign_()
                        if not equal_weights:
                            d[i].mul_(weights[i])
                    divisor = _sum_rows(d, v)
                    if equal_weights:  # counted the contributors; none: divide by 1
                        none = torch.sign(divisor, out=spare[:m]).neg_().add_(1)  # 1 where the count is 0
                        divisor.mul_(weights[0]).add_(none)
                    else:
                        divisor.add_(torch.eq(divisor, 0, out=zero[:m]))
                    mx.div_(divisor)
            else:
                mx = v
                if normalize:
                    mx.div_(total if abs(total) >= 1e-8 else 1.0)
            torch.add(b, mx, alpha=lam, out=dest[s - offset:e - offset])

    if out is not None:
        blocks.map(lambda s0, e0: merge(s0, e0, out, 0))
        return
    # streamed: pieces of whole blocks, each merged by every worker, then handed out
    size = min(n, max(blocks.block, (READ_ELEMENTS // blocks.block) * blocks.block))
    piece = torch.empty(size, dtype=torch.float32)
    for ps in range(0, n, size):
        pe = min(ps + size, n)
        blocks.map(lambda s0, e0: merge(s0, e0, piece, ps), ps, pe)
        yield ps, pe, piece[: pe - ps]


def _sum_rows(d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """d.sum(dim=0) into out, row after row: the same float32 sums in the same order,
    and never split over threads (a worker thread is already one of them)."""
    if d.shape[0] == 1:
        return out.copy_(d[0])
    torch.add(d[0], d[1], out=out)
    for i in range(2, d.shape[0]):
        out.add_(d[i])
    return out


def generalized_task_arithmetic(
    base, experts, expert_params, params, generator, name, *, sparsifier: str | None, consensus: str | None
) -> torch.Tensor:
    """The merged tensor in float32 (see gta_blocks); memory: the inputs, the output
    and a few block buffers per worker."""
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    for _ in gta_blocks(base, experts, expert_params, params, generator, name,
                        sparsifier=sparsifier, consensus=consensus, out=out):
        pass
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
        blocks=partial(gta_blocks, sparsifier=sparsifier, consensus=consensus),
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
