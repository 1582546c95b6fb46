"""Compiled (numba) kernels of the merge engine: the non-random task-arithmetic merges
(TIES, breadcrumbs with and without TIES, task arithmetic), the inputs' and outputs'
NaN/Inf check, and the float32 -> bfloat16 cast.

The torch form of the merges (mergescale.merge.methods.task_arithmetic) spends most of
its time dispatching ~25 small operations per block and expert; here each step is one
loop over a block, compiled. Results are bit-identical to the torch form: every
float32 operation is the one torch does, in the same order (torch.add with alpha is a
fused multiply-add, and so is the last step here), and zeros keep the signs torch
gives them (hardshrink writes +0, relu keeps -0, sign(+-0) is +0).

bfloat16 inputs are read as their 16 bits and widened in the loops (bits << 16), so
no float32 copy of an input is made; float32 inputs are read as they are; any other
float dtype, or a mix, is converted to float32 a read range at a time.

Each magnitude cut (the top k of |tau|, ties at the threshold going to the lowest flat
indices: mergescale.merge.ops.Cut's rule) is exact and found in linear time. A sample
of |tau| brackets the threshold; one pass over every expert at once counts the entries
above the bracket and collects those inside it (a few percent), among which the
threshold and the index where its ties stop being kept are selected. When the bracket
misses, a radix select over |tau|'s float32 bits (integer order is numeric order for
non-negative floats) finds it: a histogram of the high 16 bits, one of the low 16 bits
inside the chosen bucket, and a count of the ties for their index.

`compiled_merge_applies` is the one place that decides between this and torch.
Compiled code is cached (numba's cache=True: next to this file, or in the user's
cache directory when that is read-only); MERGESCALE_MERGE_KERNEL=torch turns every
kernel here off.
"""

from __future__ import annotations

import logging
import math
import os
import threading

import numpy as np
import torch

from mergescale.merge import ops

log = logging.getLogger("mergescale.merge")

try:  # numba is a dependency, but the torch form works without it
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
else:
    # numba's own thread pool, whose workers sleep between calls (OpenMP's spin, which
    # costs CPU time that other work on a busy machine needs). It must never be entered
    # from two threads at once: every parallel call goes through _LAUNCH.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
_LAUNCH = threading.RLock()

# Elements per block inside a read range: a block's task vectors (one per expert)
# stay in a core's L1/L2 cache across the steps of the merge.
BLOCK = 2048
_HIGH = 1 << 15  # buckets of |tau|'s high 16 bits (the sign bit is 0)
_LOW = 1 << 16

# sparsifier kinds of one expert, as the kernel knows them
NONE, MAGNITUDE, OUTLIERS = 0, 1, 2


def available() -> bool:
    """Whether the compiled form can run (numba imports and it is not turned off)."""
    return numba is not None and os.environ.get("MERGESCALE_MERGE_KERNEL", "numba") != "torch"


def compiled_merge_applies(sparsifiers, consensus: str | None, sources, device: torch.device) -> bool:
    """The one decision: the compiled form runs when numba is there, every expert's
    sparsifier is deterministic (none, magnitude, outlier band), the consensus is
    none or "sum", and the inputs are float tensors on the CPU."""
    if not available() or device.type != "cpu":
        return False
    if consensus not in (None, "sum"):
        return False
    if any(sp.kind not in (None, "magnitude", "outliers") for sp in sparsifiers):
        return False
    return all(src.dtype.is_floating_point and src.dtype != torch.float64 for src in sources)


if numba is not None:
    def _jit(**options):
        """numba.njit with a compiled-code cache where one can be written, else without."""
        def wrap(fn):
            try:
                return numba.njit(cache=True, nogil=True, **options)(fn)
            except RuntimeError as e:  # no writable cache location
                log.debug("numba cache unavailable for %s: %s", fn.__name__, e)
                return numba.njit(nogil=True, **options)(fn)
        return wrap

    @intrinsic
    def _f32_of_bits(typingctx, bits):
        """The float32 whose bit pattern is the low 32 bits of an integer."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            v, i32 = args[0], ir.IntType(32)
            if bits.bitwidth > 32:
                v = builder.trunc(v, i32)
            elif bits.bitwidth < 32:
                v = builder.zext(v, i32)
            return builder.bitcast(v, ir.FloatType())
        return types.float32(bits), codegen

    @intrinsic
    def _bits_of_f32(typingctx, x):
        """The bit pattern of a float32, as uint32."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(x), codegen

    @intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c rounded once (torch.add(c, a, alpha=b) on the CPU)."""
        if not (a == b == c == types.float32):
            return None

        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return types.float32(a, b, c), codegen

    @intrinsic
    def _widen(typingctx, v):
        """An input element as float32: bfloat16 (read as uint16) shifted into the high
        bits of a float32, float32 as it is."""
        if v == types.uint16:
            def codegen(context, builder, signature, args):
                x = builder.zext(args[0], ir.IntType(32))
                return builder.bitcast(builder.shl(x, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
            return types.float32(v), codegen
        if v == types.float32:
            def codegen(context, builder, signature, args):
                return args[0]
            return types.float32(v), codegen
        return None

    @_jit()
    def _magnitude_bits(x, b):
        """|x - b| (float32, as torch's sub then abs) as its bit pattern."""
        return _bits_of_f32(_widen(x) - _widen(b)) & np.uint32(0x7FFFFFFF)

    @_jit(parallel=True)
    def _high_histogram(base, x, bounds, hist):
        """hist[lane, h] += entries of lane's range whose |tau| has high 16 bits h."""
        for lane in numba.prange(len(bounds) - 1):
            h, xl, bl = hist[lane], x[bounds[lane]:bounds[lane + 1]], base[bounds[lane]:bounds[lane + 1]]
            for j in range(len(xl)):  # (indices from 0 up: no negative-index handling)
                h[_magnitude_bits(xl[j], bl[j]) >> np.uint32(16)] += 1

    @_jit(parallel=True)
    def _low_histogram(base, x, bounds, buckets, low):
        """low[lane, c, l] += entries whose |tau| has high bits buckets[c], low bits l."""
        for lane in numba.prange(len(bounds) - 1):
            xl, bl = x[bounds[lane]:bounds[lane + 1]], base[bounds[lane]:bounds[lane + 1]]
            for j in range(len(xl)):
                bits = _magnitude_bits(xl[j], bl[j])
                high = bits >> np.uint32(16)
                for c in range(len(buckets)):
                    if high == buckets[c]:
                        low[lane, c, bits & np.uint32(0xFFFF)] += 1

    @_jit(parallel=True)
    def _count_equal(base, x, bounds, target, counts):
        """counts[lane] = entries of lane's range whose |tau| has bit pattern `target`."""
        for lane in numba.prange(len(bounds) - 1):
            c = 0
            xl, bl = x[bounds[lane]:bounds[lane + 1]], base[bounds[lane]:bounds[lane + 1]]
            for j in range(len(xl)):
                c += _magnitude_bits(xl[j], bl[j]) == target
            counts[lane] = c

    @_jit()
    def _nth_equal(base, x, s0, e0, target, nth):
        """Index of the nth (1-based) entry in [s0, e0) whose |tau| has bits `target`."""
        seen = 0
        xl, bl = x[s0:e0], base[s0:e0]
        for j in range(len(xl)):
            if _magnitude_bits(xl[j], bl[j]) == target:
                seen += 1
                if seen == nth:
                    return s0 + j
        return -1

    @_jit(parallel=True)
    def _bands(base, experts, bounds, low, high, above, count, band_bits, band_index):
        """Per lane and cut c (of experts[c]): above[lane, c] = entries with |tau| bits
        > high[c]; count[lane, c] entries with bits in [low[c], high[c]], stored with
        their indices in flat order (count > band_bits.shape[2]: they did not fit)."""
        room = band_bits.shape[2]
        for lane in numba.prange(len(bounds) - 1):
            bits = np.empty(BLOCK, dtype=np.uint32)
            for c in range(len(experts)):
                above[lane, c] = count[lane, c] = 0
            for s in range(bounds[lane], bounds[lane + 1], BLOCK):
                m = min(BLOCK, bounds[lane + 1] - s)
                bb = base[s:s + m]
                for c in range(len(experts)):
                    xb, lo, hi = experts[c][s:s + m], low[c], high[c]
                    width = hi - lo
                    a, inside = 0, 0
                    for j in range(m):  # vectorised: counts only
                        b = _magnitude_bits(xb[j], bb[j])
                        bits[j] = b
                        a += b > hi
                        inside += np.uint32(b - lo) <= width  # lo <= b <= hi (unsigned wrap-around)
                    above[lane, c] += a
                    n = count[lane, c]
                    if inside == 0:
                        continue
                    if n + m >= room:  # full: the caller finds this cut another way
                        count[lane, c] = room + 1
                        continue
                    for j in range(m):  # branch-free compaction: written always, kept when inside
                        band_bits[lane, c, n] = bits[j]
                        band_index[lane, c, n] = s + j
                        n += np.uint32(bits[j] - lo) <= width
                    count[lane, c] = n

    @_jit()
    def _sample_bits(base, x, step, run, out):
        """|tau|'s bits at runs of `run` entries every `step` entries (out's size / run
        runs): a sample that reads a few cache lines of the tensor, not all of them."""
        for r in range(len(out) // run):
            xr, br, o = x[r * step:r * step + run], base[r * step:r * step + run], out[r * run:(r + 1) * run]
            for j in range(run):
                o[j] = _magnitude_bits(xr[j], br[j])

    @_jit()
    def _count_non_finite(bits, exponent):
        """Entries whose exponent bits (the mask `exponent`) are all ones: NaN or +-Inf.
        Serial: it runs on the reader thread, beside a merge's parallel work."""
        bad = 0
        for j in range(len(bits)):
            bad += (bits[j] & exponent) == exponent
        return bad

    @_jit()
    def _round_to_bfloat16(bits, out):
        """float32 bits to bfloat16 bits, rounding to nearest even (torch's rule)."""
        for j in range(len(bits)):
            b = bits[j]
            rounded = (b + (np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
            nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            out[j] = np.uint16(0x7FC0) if nan else np.uint16(rounded)

    @_jit()
    def _trim(t, threshold):
        """torch.hardshrink: +0 where -threshold <= t <= threshold, else t."""
        if -threshold <= t and t <= threshold:
            return np.float32(0.0)
        return t

    @_jit(parallel=True)
    def _merge(base, experts, start, bounds, kinds, high, low, cutoff, rescale, weights,
               consensus, normalize, equal_weights, total, lam, out):
        """out[j] = the merged entry j of this read range (flat offset `start`).

        Per expert i: kinds[i] (NONE, MAGNITUDE: trim by cut 0, OUTLIERS: trim by cut 0
        minus trim by cut 1); a cut c keeps |tau| > high[i, c], and |tau| >= it (that is,
        > low[i, c]) below the flat index cutoff[i, c]; rescale[i] divides (1: none),
        weights[i] multiplies. The steps and their order are those of the torch form."""
        k = len(experts)
        one, zero = np.float32(1.0), np.float32(0.0)
        for lane in numba.prange(len(bounds) - 1):
            d = np.empty((k, BLOCK), dtype=np.float32)
            votes = np.empty(BLOCK, dtype=np.float32)
            elected = np.empty(BLOCK, dtype=np.float32)
            mixed = np.empty(BLOCK, dtype=np.float32)
            count = np.empty(BLOCK, dtype=np.float32)
            for s in range(bounds[lane], bounds[lane + 1], BLOCK):
                m = min(BLOCK, bounds[lane + 1] - s)
                g = start + s  # flat index of the block's first entry
                bb = base[s:s + m]  # (blocks are indexed from 0 up: no negative-index handling)
                for i in range(k):
                    x, di, kind = experts[i][s:s + m], d[i], kinds[i]
                    if kind == NONE:
                        for j in range(m):
                            di[j] = _widen(x[j]) - _widen(bb[j])
                    elif kind == MAGNITUDE:
                        c = min(max(cutoff[i, 0] - g, 0), m)
                        t_low, t_high = low[i, 0], high[i, 0]
                        for j in range(c):
                            di[j] = _trim(_widen(x[j]) - _widen(bb[j]), t_low)
                        for j in range(c, m):
                            di[j] = _trim(_widen(x[j]) - _widen(bb[j]), t_high)
                    else:
                        c0, c1 = cutoff[i, 0] - g, cutoff[i, 1] - g
                        for j in range(m):
                            t = _widen(x[j]) - _widen(bb[j])
                            kept = _trim(t, low[i, 0] if j < c0 else high[i, 0])
                            di[j] = kept - _trim(t, low[i, 1] if j < c1 else high[i, 1])
                    if rescale[i] != one:
                        for j in range(m):
                            di[j] = di[j] / rescale[i]
                    if weights[i] != one:
                        for j in range(m):
                            di[j] = di[j] * weights[i]
                    if i == 0:
                        for j in range(m):
                            votes[j] = di[j]
                    else:
                        for j in range(m):
                            votes[j] = votes[j] + di[j]
                mix = votes
                if consensus:
                    for j in range(m):  # copysign(1, votes)
                        elected[j] = _f32_of_bits((_bits_of_f32(votes[j]) & np.uint32(0x80000000))
                                                  | np.uint32(0x3F800000))
                    for i in range(k):
                        di, w = d[i], weights[i]
                        for j in range(m):
                            r = di[j] * elected[j]
                            if r < zero:  # relu (keeps -0)
                                r = zero
                            sign = one if r > zero else zero
                            if not equal_weights:
                                sign = sign * w
                            if i == 0:
                                mixed[j] = r
                                count[j] = sign
                            else:
                                mixed[j] = mixed[j] + r
                                count[j] = count[j] + sign
                    for j in range(m):
                        mixed[j] = mixed[j] * elected[j]
                    if normalize:
                        for j in range(m):
                            divisor = count[j]
                            if equal_weights:  # counted the contributors; none: divide by 1
                                sign = one if divisor > zero else (-one if divisor < zero else zero)
                                divisor = divisor * weights[0] + (-sign + one)
                            elif divisor == zero:
                                divisor = divisor + one
                            else:
                                divisor = divisor + zero
                            mixed[j] = mixed[j] / divisor
                    mix = mixed
                elif normalize:
                    for j in range(m):
                        votes[j] = votes[j] / total
                ob = out[s:s + m]
                for j in range(m):
                    ob[j] = _fma(mix[j], lam, _widen(bb[j]))


_EXPONENT = {torch.bfloat16: (torch.int16, np.uint16, 0x7F80), torch.float16: (torch.int16, np.uint16, 0x7C00),
             torch.float32: (torch.int32, np.uint32, 0x7F800000)}


def count_non_finite(t: torch.Tensor) -> int:
    """How many NaN/Inf entries a float tensor holds: on the CPU, one compiled pass over
    its bits (torch's aminmax on bfloat16 costs several times more), else torch."""
    if available() and t.dtype in _EXPONENT and t.device.type == "cpu" and t.is_contiguous():
        view, np_type, exponent = _EXPONENT[t.dtype]
        return int(_count_non_finite(t.detach().reshape(-1).view(view).numpy().view(np_type), np_type(exponent)))
    # min and max propagate NaN and show +-Inf: one cheap reduction instead of an
    # elementwise isfinite mask
    low, high = torch.aminmax(t)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return 0
    return int((~torch.isfinite(t)).sum())


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), with float32 -> bfloat16 on the CPU done by a compiled serial loop
    (the same rounding; torch's would wake its thread pool, whose spinning costs a busy
    CPU more than the cast)."""
    if not (available() and t.dtype == torch.float32 and dtype == torch.bfloat16 and t.device.type == "cpu"
            and t.is_contiguous()):
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=torch.bfloat16)
    _round_to_bfloat16(t.detach().reshape(-1).view(torch.int32).numpy().view(np.uint32),
                       out.reshape(-1).view(torch.int16).numpy().view(np.uint16))
    return out


# -- the driver ----------------------------------------------------------------------
def _as_array(t: torch.Tensor, widen: bool) -> np.ndarray:
    """A flat CPU tensor as numpy without a copy: bfloat16 as its bits (uint16), float32
    as is; other floats (or any input when `widen`) converted to float32."""
    if not widen and t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(np.uint16)
    return t.detach().to(torch.float32).numpy()


class _Ranges:
    """The inputs (base first) read `size` entries at a time (a tensor on disk is never
    held whole; a range of a float16 input is converted to float32 whole), as numpy
    arrays of one dtype."""

    def __init__(self, sources, threads: int, size: int):
        self.sources, self.n, self.size = sources, sources[0].numel, size
        dtypes = {s.dtype for s in sources}
        # bfloat16 is read as bits only when every input is bfloat16 (one kernel per dtype)
        self.widen = dtypes != {torch.bfloat16}
        self.threads = threads
        # whole inputs are numpy views, without a copy
        self.in_memory_arrays = all(getattr(s, "in_memory", False) for s in sources) and \
            (not self.widen or dtypes == {torch.float32})

    def ranges(self):
        for s in range(0, self.n, self.size):
            yield s, min(s + self.size, self.n)

    def read(self, s: int, e: int, which=None) -> list[np.ndarray]:
        which = range(len(self.sources)) if which is None else which
        return [_as_array(self.sources[i].read(s, e).reshape(-1), self.widen) for i in which]

    def bounds(self, m: int) -> np.ndarray:
        """Lane boundaries of a range of m entries: one contiguous lane per thread, in
        whole blocks."""
        blocks = -(-m // BLOCK)
        per = -(-blocks // self.threads)
        edges = [min(i * per * BLOCK, m) for i in range(self.threads + 1)]
        return np.asarray(sorted(set(edges)), dtype=np.int64)


def _top_of(hist: np.ndarray, k: int) -> tuple[int, int, int]:
    """In a histogram over ordered bins, the bin holding the k-th largest entry (k >= 1):
    (bin, entries in higher bins, entries in it); as mergescale.merge.ops._top_of."""
    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, k))
    above = int(from_top[j - 1]) if j > 0 else 0
    b = hist.size - 1 - j
    return b, above, int(hist[b])


class _Cut:
    """One expert's top-k cut as the kernel reads it: |tau| > high kept, and |tau| >=
    high (> low) below flat index cutoff (ops.Cut's rule)."""

    def __init__(self, threshold: float, cutoff: int = 0):
        if threshold == 0:
            cutoff = 0  # kept zeros are zeros anyway (ops.Cut.trim_ keeps |x| > 0)
        self.high = np.float32(threshold)
        finite = 0 < threshold < math.inf
        self.low = np.nextafter(self.high, np.float32(-np.inf)) if finite else self.high
        self.cutoff = cutoff


def _find_cuts(reader: _Ranges, wants: list[tuple[int, int]]) -> list[_Cut]:
    """The cut of the top k of |tau_i| for each (expert i, k)."""
    n = reader.n
    cuts: list[_Cut | None] = [_Cut(math.inf) if k <= 0 else _Cut(-math.inf) if k >= n else None
                               for _, k in wants]
    todo = [j for j, c in enumerate(cuts) if c is None]
    if todo:
        _cuts_in_bands(reader, wants, todo, cuts)
    missed = [j for j in todo if cuts[j] is None]
    if missed:
        _cuts_by_radix(reader, wants, missed, cuts)
    return cuts


SAMPLE_RUN = 32  # entries per run of the in-memory sample (a 64-byte line of bfloat16)


def _samples(reader: _Ranges, experts: list[int]) -> dict[int, np.ndarray]:
    """A sample of each expert's |tau| as float32 bits: in memory, runs of SAMPLE_RUN
    entries spread evenly (as many entries as ops' strided sample holds); else
    ops.magnitude_samples (runs read from the files)."""
    n = reader.n
    if reader.in_memory_arrays:
        m = n // ops._sample_step(n)
        runs = max(1, min(n, m) // SAMPLE_RUN)
        run = min(SAMPLE_RUN, n)
        step = n // runs
        arrays = [_as_array(reader.sources[i].flat, reader.widen) for i in [0] + [1 + i for i in experts]]
        out = {}
        for a, i in zip(arrays[1:], experts):
            out[i] = np.empty(runs * run, dtype=np.uint32)
            _sample_bits(arrays[0], a, step, run, out[i])
        return out
    return {i: t.numpy().view(np.uint32) for i, t in ops.magnitude_samples(reader.sources, experts).items()}


def _bracket(sample: np.ndarray, n: int, k: int) -> tuple[int, int]:
    """Bits (lo, hi) very probably enclosing the k-th largest of n magnitudes, from a
    sample of their bits (ops.bracket_of_sample's rule; -inf is 0, +inf 0x7F800000)."""
    m, q = sample.size, k / n
    slack = 6 * math.sqrt(m * q * (1 - q)) + 8
    i_hi, i_lo = math.floor(q * m - slack), math.ceil(q * m + slack)
    at = [m - i - 1 for i in (i_hi, i_lo) if 0 <= i < m]  # 0-based ranks from the bottom
    part = np.partition(sample, at) if at else sample
    hi = int(part[m - i_hi - 1]) if i_hi >= 0 else _INF_BITS
    lo = int(part[m - i_lo - 1]) if i_lo < m else 0
    return lo, hi


_INF_BITS = 0x7F800000


def _cuts_in_bands(reader: _Ranges, wants, todo: list[int], cuts: list) -> None:
    """One pass: a sample of each |tau_i| brackets its threshold (see _bracket);
    the pass counts the entries above the bracket and collects those inside it, among
    which the threshold and the tie index are found. Cuts whose bracket missed, or
    whose bracket held too many entries to collect, stay None."""
    samples = _samples(reader, sorted({wants[j][0] for j in todo}))
    bands = {}
    for j in todo:
        i, k = wants[j]
        lo, hi = _bracket(samples[i], reader.n, k)
        # the band holds positive magnitudes only (zeros are never told apart)
        bands[j] = (max(lo, 1), hi, lo == 0)
    above = dict.fromkeys(todo, 0)
    pool_bits = {j: [] for j in todo}
    pool_index = {j: [] for j in todo}
    overflow = set()
    experts = sorted({wants[j][0] for j in todo})
    low = np.asarray([bands[j][0] for j in todo], dtype=np.uint32)
    high = np.asarray([bands[j][1] for j in todo], dtype=np.uint32)
    for s, e in reader.ranges():
        arrays = reader.read(s, e, [0] + [1 + i for i in experts])
        x_of = dict(zip(experts, arrays[1:]))
        bounds = reader.bounds(e - s)
        lanes = len(bounds) - 1
        room = int(np.diff(bounds).max()) // 8 + BLOCK + 1  # bands hold ~1-5% of the entries
        band_bits = np.empty((lanes, len(todo), room), dtype=np.uint32)
        band_index = np.empty((lanes, len(todo), room), dtype=np.int32)
        a = np.empty((lanes, len(todo)), dtype=np.int64)
        c = np.empty((lanes, len(todo)), dtype=np.int64)
        _bands(arrays[0], tuple(x_of[wants[j][0]] for j in todo), bounds, low, high, a, c,
               band_bits, band_index)
        for col, j in enumerate(todo):
            if (c[:, col] > room).any():
                overflow.add(j)
            if j in overflow:
                continue
            above[j] += int(a[:, col].sum())
            for lane in range(lanes):
                pool_bits[j].append(band_bits[lane, col, :c[lane, col]].copy())
                pool_index[j].append(band_index[lane, col, :c[lane, col]].astype(np.int64) + s)
    for j in todo:
        if j in overflow:
            continue
        pool = np.concatenate(pool_bits[j]) if pool_bits[j] else np.empty(0, dtype=np.uint32)
        r = wants[j][1] - above[j]  # rank of the threshold inside the band, from the top
        if r <= 0:
            continue  # the bracket missed (above it)
        if r > pool.size:
            if bands[j][2]:  # every positive magnitude is in the top k: the threshold is zero
                cuts[j] = _Cut(0.0)
            continue
        t = np.partition(pool, pool.size - r)[pool.size - r]
        kept = r - int(np.count_nonzero(pool > t))  # entries equal to t that are kept
        tied = np.concatenate(pool_index[j])[pool == t]
        cuts[j] = _Cut(float(t.view(np.float32)), int(tied[kept - 1]) + 1)


def _cuts_by_radix(reader: _Ranges, wants, todo: list[int], cuts: list) -> None:
    """Cuts by radix select over |tau|'s bits: a histogram of the high 16 bits finds the
    bucket holding the k-th largest value, a histogram of the low 16 bits of that
    bucket's members the value; where only some entries equal to it are kept, a count
    of them finds the flat index where they stop being kept."""
    n = reader.n
    experts = sorted({wants[j][0] for j in todo})
    lanes = reader.threads
    # 1. high 16 bits of |tau| per expert
    high = {i: np.zeros((lanes, _HIGH), dtype=np.int64) for i in experts}
    for s, e in reader.ranges():
        arrays = reader.read(s, e, [0] + [1 + i for i in experts])
        bounds = reader.bounds(e - s)
        for a, i in zip(arrays[1:], experts):
            _high_histogram(arrays[0], a, bounds, high[i])
    found = {}
    for j in todo:
        i, k = wants[j]
        bucket, above, _ = _top_of(high[i].sum(axis=0), k)
        found[j] = (bucket, above)
    # 2. low 16 bits of the members of each cut's bucket
    per_expert = {i: [j for j in todo if wants[j][0] == i] for i in experts}
    low = {i: np.zeros((lanes, len(js), _LOW), dtype=np.int64) for i, js in per_expert.items()}
    buckets = {i: np.asarray([found[j][0] for j in js], dtype=np.uint32) for i, js in per_expert.items()}
    for s, e in reader.ranges():
        arrays = reader.read(s, e, [0] + [1 + i for i in experts])
        bounds = reader.bounds(e - s)
        for a, i in zip(arrays[1:], experts):
            _low_histogram(arrays[0], a, bounds, buckets[i], low[i])
    partial: dict[int, tuple[int, int]] = {}  # cut -> (threshold bits, how many equal to it are kept)
    for i, js in per_expert.items():
        for c, j in enumerate(js):
            bucket, above = found[j]
            low_bits, above_low, equal = _top_of(low[i][:, c].sum(axis=0), wants[j][1] - above)
            bits = (bucket << 16) | low_bits
            threshold = float(np.uint32(bits).view(np.float32))
            kept = wants[j][1] - above - above_low
            if kept >= equal:  # every entry equal to the threshold is kept
                cuts[j] = _Cut(threshold, n)
            else:
                partial[j] = (bits, kept)
    # 3. the flat index after the last entry equal to the threshold that is kept
    if not partial:
        return
    seen = {j: 0 for j in partial}
    for s, e in reader.ranges():
        if not seen:
            break
        experts_left = sorted({wants[j][0] for j in seen})
        arrays = reader.read(s, e, [0] + [1 + i for i in experts_left])
        x_of = dict(zip(experts_left, arrays[1:]))
        bounds = reader.bounds(e - s)
        counts = np.zeros(len(bounds) - 1, dtype=np.int64)
        for j in list(seen):
            bits, kept = partial[j]
            x = x_of[wants[j][0]]
            target = np.uint32(bits)
            _count_equal(arrays[0], x, bounds, target, counts)
            for lane, c in enumerate(counts.tolist()):
                if seen[j] + c >= kept:
                    index = _nth_equal(arrays[0], x, bounds[lane], bounds[lane + 1], target, kept - seen[j])
                    cuts[j] = _Cut(float(target.view(np.float32)), s + int(index) + 1)
                    del seen[j]
                    break
                seen[j] += c
    if seen:  # cannot happen: the count above saw them
        raise RuntimeError("top-k tie index not found")


def merge_ranges(sources, sparsifiers, weights: list[float], params: dict, consensus: str | None,
                 threads: int, read_elements: int, out: torch.Tensor | None = None):
    """Generalised task arithmetic, compiled: yields (start, end, merged float32 piece)
    per range of `read_elements` (a piece is valid until the next), or fills `out`
    (flat float32) and yields nothing. `sparsifiers`: task_arithmetic._Sparsifier per
    expert."""
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)  # (for this thread: the one that launches)
    reader = _Ranges(sources, threads, read_elements)
    k = len(sources) - 1
    wants = [(i, q) for i, sp in enumerate(sparsifiers) for q in sp.ks]
    with _LAUNCH:
        cuts = iter(_find_cuts(reader, wants))
    kinds = np.zeros(k, dtype=np.int64)
    high = np.zeros((k, 2), dtype=np.float32)
    low = np.zeros((k, 2), dtype=np.float32)
    cutoff = np.zeros((k, 2), dtype=np.int64)
    rescale = np.ones(k, dtype=np.float32)
    for i, sp in enumerate(sparsifiers):
        kinds[i] = {None: NONE, "magnitude": MAGNITUDE, "outliers": OUTLIERS}[sp.kind]
        for c in range(len(sp.ks)):
            cut = next(cuts)
            high[i, c], low[i, c], cutoff[i, c] = cut.high, cut.low, cut.cutoff
        if sp.kind is not None and sp.rescale:
            rescale[i] = sp.density
    w = np.asarray(weights, dtype=np.float32)
    total = sum(weights)
    total = np.float32(total if abs(total) >= 1e-8 else 1.0)
    args = (kinds, high, low, cutoff, rescale, w, consensus is not None, bool(params["normalize"]),
            len(set(weights)) == 1, total, np.float32(params["lambda"]))
    piece = None if out is not None else np.empty(min(read_elements, reader.n), dtype=np.float32)
    target = out.numpy() if out is not None else None
    for s, e in reader.ranges():
        arrays = reader.read(s, e)
        experts = tuple(arrays[1:])  # (a tuple: numba's typed list compiles itself anew in every process)
        dest = target[s:e] if target is not None else piece[: e - s]
        with _LAUNCH:
            _merge(arrays[0], experts, s, reader.bounds(e - s), *args, dest)
        if target is None:
            yield s, e, torch.from_numpy(dest)
