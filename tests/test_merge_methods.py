"""Known-answer tests for merge methods and the shared tensor operations.

Expected values are worked out by hand in the comments, from the papers' definitions.
"""

from __future__ import annotations

import pytest
import torch

from mergescale.merge import get_method, validate_params
from mergescale.merge import ops


def run(method: str, base, experts, expert_params=None, seed: int = 0, name: str = "w", **params):
    m = get_method(method)
    resolved = validate_params(m, params, expert_params, n_experts=len(experts))
    gen = None
    if m.randomised:
        gen = torch.Generator().manual_seed(seed)
    return m.function(base, experts, resolved.expert_params, resolved.params, gen, name)


# -- shared operations --------------------------------------------------------------------
def test_top_k_mask_breaks_ties_towards_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert ops.top_k_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert ops.top_k_mask(scores, 0).sum() == 0
    assert ops.top_k_mask(scores, 9).all()


def test_top_k_masks_are_nested():
    scores = torch.randint(0, 5, (200,)).float()  # many ties
    for a, b in [(3, 10), (10, 57), (57, 199)]:
        small, large = ops.top_k_mask(scores, a), ops.top_k_mask(scores, b)
        assert int(small.sum()) == a and int(large.sum()) == b
        assert not (small & ~large).any()


def test_magnitude_mask_keeps_at_least_one():
    x = torch.tensor([0.1, -5.0, 0.3])
    assert ops.magnitude_mask(x, 0.01).tolist() == [False, True, False]


def test_elect_sign_sum_and_count():
    stacked = torch.tensor([[3.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 5.0, 0.0]])
    # sums: 1, 3, 0 -> +, +, + (0 goes to +); counts of signs: -1, -1, 0 -> -, -, +
    assert ops.elect_sign(stacked, "sum").tolist() == [1.0, 1.0, 1.0]
    assert ops.elect_sign(stacked, "count").tolist() == [-1.0, -1.0, 1.0]


def test_della_keep_probability_rises_with_rank():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.2, -0.1]])
    # ranks by |x| per row: [0, 2, 1] and [2, 1, 0] -> density - eps + rank/2 * 2 eps
    p = ops.della_keep_probability(x, density=0.5, epsilon=0.1)
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.6, 0.5], [0.6, 0.5, 0.4]]))


def test_tensor_seed_depends_on_seed_and_name():
    assert ops.tensor_seed(0, "a") == ops.tensor_seed(0, "a")
    assert len({ops.tensor_seed(0, "a"), ops.tensor_seed(1, "a"), ops.tensor_seed(0, "b")}) == 3


# -- linear and task arithmetic -----------------------------------------------------------
def test_linear_weighted_average():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    # (1*a + 3*b) / 4 = [10/4, 20/4]
    out = run("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(out, torch.tensor([2.5, 5.0]))
    out = run("linear", None, [a, b], [{"weight": 1.0}, {"weight": 3.0}], normalize=False)
    torch.testing.assert_close(out, torch.tensor([10.0, 20.0]))


def test_linear_computes_in_float32_from_bfloat16():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    out = run("linear", None, [a, a])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.float())


def test_task_arithmetic():
    base = torch.tensor([1.0, 1.0, 1.0])
    e1, e2 = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])
    # tau1 = [1, 0, -1], tau2 = [0, 2, 0]; base + 0.5 * (2*tau1 + 1*tau2) = [2, 2, 0]
    out = run("task_arithmetic", base, [e1, e2], [{"weight": 2.0}, {"weight": 1.0}], **{"lambda": 0.5})
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 0.0]))


def test_ties_hand_worked_2x3():
    base = torch.ones(2, 3)
    tau1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 1.0]])
    tau2 = torch.tensor([[-1.0, -2.0, 2.0], [1.0, -3.0, 0.2]])
    # Trim to density 0.5 (3 of 6 by magnitude):
    #   tau1 -> [[3, 0, 0], [-2, 4, 0]]   tau2 -> [[0, -2, 2], [0, -3, 0]]
    # Elect sign of the sum [[3, -2, 2], [-2, 1, 0]] -> [[+, -, +], [-, +, +]]
    # Disjoint mean of agreeing entries (tau2's -3 at (1,1) disagrees):
    #   [[3, -2, 2], [-2, 4, 0]]
    out = run("ties", base, [base + tau1, base + tau2], density=0.5)
    torch.testing.assert_close(out, base + torch.tensor([[3.0, -2.0, 2.0], [-2.0, 4.0, 0.0]]))


def test_ties_weights_and_lambda():
    base = torch.zeros(4)
    tau1, tau2 = torch.tensor([2.0, -1.0, 1.0, 0.0]), torch.tensor([4.0, 3.0, -1.0, 0.0])
    # density 1: weighted w1=1, w2=3: [2, -1, 1, 0] and [12, 9, -3, 0]; sums [14, 8, -2, 0]
    # signs [+, +, -, +]; agreeing: (0): both -> (2+12)/(1+3)=3.5; (1): only e2 -> 9/3=3;
    # (2): only e2 -> -3/3=-1; (3): none -> 0. lambda 2 doubles.
    out = run("ties", base, [tau1, tau2], [{"weight": 1.0}, {"weight": 3.0}], **{"lambda": 2.0})
    torch.testing.assert_close(out, torch.tensor([7.0, 6.0, -2.0, 0.0]))


def test_dare_linear_is_unbiased_and_rescaled():
    base = torch.zeros(200_000)
    expert = torch.ones(200_000)
    out = run("dare_linear", base, [expert], density=0.25, seed=3)
    values = set(out.unique().tolist())
    assert values <= {0.0, 4.0}  # kept entries rescaled by 1/0.25
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.03  # E[mask/density * tau] = tau


def test_dare_density_one_equals_task_arithmetic():
    torch.manual_seed(0)
    base, e1, e2 = torch.randn(3, 5, 7).unbind(0)
    torch.testing.assert_close(run("dare_linear", base, [e1, e2]), run("task_arithmetic", base, [e1, e2]))


def test_dare_ties_single_expert_and_seed():
    torch.manual_seed(0)
    base, e1 = torch.randn(2, 1000).unbind(0)
    a = run("dare_ties", base, [e1], density=0.5, seed=1)
    b = run("dare_ties", base, [e1], density=0.5, seed=1)
    c = run("dare_ties", base, [e1], density=0.5, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    delta = a - base
    kept = delta != 0
    # one expert: every kept entry agrees with itself, so delta = tau / density there
    torch.testing.assert_close(delta[kept], ((e1 - base) / 0.5)[kept])


def test_dare_ties_elects_signs():
    base = torch.zeros(3)
    e1, e2 = torch.tensor([1.0, -4.0, 2.0]), torch.tensor([-3.0, 1.0, 2.0])
    # density 1 (no drop), no normalize: sums [-2, -3, 4] -> signs [-, -, +];
    # kept: (0) e2 -> -3; (1) e1 -> -4; (2) both -> 4
    out = run("dare_ties", base, [e1, e2])
    torch.testing.assert_close(out, torch.tensor([-3.0, -4.0, 4.0]))


def test_breadcrumbs_drops_outliers_and_small_values():
    base = torch.zeros(10)
    tau = torch.arange(1.0, 11.0)  # 1..10
    # density 0.5 keeps 5, gamma 0.1 drops the largest 1: keep 5..9
    out = run("breadcrumbs", base, [tau], density=0.5, gamma=0.1)
    torch.testing.assert_close(out, torch.tensor([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0]))


def test_breadcrumbs_ties_combines_band_and_sign():
    base = torch.zeros(4)
    e1 = torch.tensor([1.0, 2.0, -3.0, 100.0])
    e2 = torch.tensor([-5.0, 1.0, 2.0, 0.5])
    # density 0.5 (2 of 4), gamma 0.25 (drop top 1): e1 keeps |2|,|-3| -> [0, 2, -3, 0]
    # e2 keeps |2|,|1| -> [0, 1, 2, 0]; sums [0, 3, -1, 0] -> signs [+, +, -, +]
    # (1): 2 + 1 = 3; (2): only e1 -> -3; no normalize
    out = run("breadcrumbs_ties", base, [e1, e2], density=0.5, gamma=0.25)
    torch.testing.assert_close(out, torch.tensor([0.0, 3.0, -3.0, 0.0]))


def test_della_keeps_by_rank_and_rescales():
    torch.manual_seed(0)
    base = torch.zeros(1, 50_000)
    tau = torch.linspace(0.01, 1.0, 50_000).reshape(1, -1)
    out = run("della_linear", base, [tau], density=0.5, epsilon=0.4, seed=5)
    kept = out != 0
    # keep probability rises from 0.1 (smallest) to 0.9 (largest)
    assert kept[0, :5000].float().mean() < 0.2 and kept[0, -5000:].float().mean() > 0.8
    # kept entries are divided by their own probability; expectation is unchanged
    p = ops.della_keep_probability(tau, 0.5, 0.4)
    torch.testing.assert_close(out[kept], (tau / p)[kept])
    assert abs(out.sum().item() / tau.sum().item() - 1) < 0.02


def test_della_rejects_bad_epsilon():
    from mergescale.merge import MergeInputError

    with pytest.raises(MergeInputError, match="epsilon"):
        run("della", torch.zeros(4, 4), [torch.ones(4, 4)], density=0.1, epsilon=0.2)


# -- exact top-k on tensors big enough for the bracketed selection ----------------------
def reference_top_k_trim(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sort-based reference: order by (|x| descending, flat index ascending)."""
    flat = x.reshape(-1)
    n = flat.numel()
    order = sorted(range(n), key=lambda i: (-abs(flat[i].item()), i))[:k] if n < 5000 else None
    if order is None:  # stable sort on -|x| keeps index order among ties
        order = torch.sort(-flat.abs(), stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(x.shape)


@pytest.mark.parametrize("kind", ["continuous", "ties", "sparse", "all_zero_tail"])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.7, 0.999])
def test_top_k_trim_matches_sorting(kind, density):
    g = torch.Generator().manual_seed(hash((kind, density)) % 2**31)
    n = 300_007
    x = torch.randn(n, generator=g)
    if kind == "ties":  # few distinct magnitudes: thresholds land inside big tie groups
        x = torch.randint(-6, 7, (n,), generator=g).float() / 4
    elif kind == "sparse":
        x[torch.rand(n, generator=g) < 0.9] = 0
    elif kind == "all_zero_tail":
        x[n // 3:] = 0
    k = ops.magnitude_k(n, density)
    expected = reference_top_k_trim(x, k)
    sel = ops.select_top_k(lambda sl: x[sl].abs(), n, k)
    streamed = torch.cat([sel.trim(x[s:e]) for s, e in ops.chunk_ranges(n, chunk=65_536)])
    assert torch.equal(streamed, expected)


@pytest.mark.parametrize("kind", ["continuous", "ties", "subnormal", "zeros"])
def test_radix_threshold_is_kthvalue(kind):
    """The linear-time select finds exactly torch.kthvalue's k-th largest, and the
    number of entries it keeps at that value makes exactly k."""
    g = torch.Generator().manual_seed(7)
    n = 100_003
    x = torch.randn(n, generator=g).abs()
    if kind == "ties":
        x = torch.randint(0, 5, (n,), generator=g).float()
    elif kind == "subnormal":
        x = x * 1e-40  # bit patterns in the lowest buckets
    elif kind == "zeros":
        x[: n // 2] = 0
    for k in (1, 17, n // 3, n // 2, n - 1):
        sel = ops.select_top_k(lambda sl: x[sl], n, k)
        assert sel.threshold == float(torch.kthvalue(x, n - k + 1).values)
        assert int(sel.mask(x).sum()) == k


def test_bracket_miss_falls_back_to_exact():
    # a pathological distribution: one value for two thirds of the entries
    n = 200_000
    x = torch.zeros(n)
    x[1::3] = torch.linspace(1, 2, len(range(1, n, 3)))
    k = 40_000
    sel = ops.select_top_k(lambda sl: x[sl].abs(), n, k)
    assert torch.equal(sel.trim(x), reference_top_k_trim(x, k))


class _OnDisk(ops.TensorSource):
    """A tensor seen as if on disk: read by ranges only, no strided sample."""

    in_memory = False

    def __init__(self, tensor):
        super().__init__(tensor)
        self.reads: list[tuple[int, int]] = []

    def read(self, start, end):
        self.reads.append((start, end))
        return self.flat[start:end].clone()


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "weight": 0.5}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.5}),
    ("task_arithmetic", {}),
    ("dare_ties", {"density": 0.4}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
])
@pytest.mark.parametrize("bracket_misses", [False, True])
def test_blocks_from_disk_equal_the_in_memory_merge(monkeypatch, method, params, bracket_misses):
    """Read by ranges (tensors too big to hold), a tensor merges to the same bits: the
    cuts come from a sample of runs (or, when its bracket misses, from histograms of
    the high bits); blocks and reads are small here."""
    from mergescale.merge.methods import task_arithmetic

    g = torch.Generator().manual_seed(0)
    base = torch.randn(640, 500, generator=g).to(torch.bfloat16)
    experts = [(base.float() + 0.01 * torch.randn(640, 500, generator=g)).to(torch.bfloat16) for _ in range(3)]
    experts[1].view(-1)[:1000] = base.view(-1)[:1000]  # zeros in a task vector, ties at the threshold
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 50_000)
    in_memory = run(method, base, experts, seed=3, **params)
    monkeypatch.setattr(task_arithmetic, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(task_arithmetic, "READ_ELEMENTS", 20_000)
    if bracket_misses:
        monkeypatch.setattr(ops, "bracket_of_sample", lambda sample, n, k: (1e30, 1e30))
    m = get_method(method)
    resolved = validate_params(m, params, None, n_experts=3)
    sources = [_OnDisk(t) for t in [base, *experts]]
    gen = torch.Generator().manual_seed(3) if m.randomised else None
    pieces = [(s, e, p.clone())  # a piece is valid until the next one is made
              for s, e, p in m.blocks(sources[0], sources[1:], resolved.expert_params, resolved.params, gen, "w")]
    assert [s for s, _, _ in pieces] == list(range(0, base.numel(), pieces[0][1]))
    streamed = torch.cat([p for _, _, p in pieces]).reshape(base.shape)
    assert torch.equal(streamed, in_memory)
    assert max(e - s for s, e in sources[0].reads) <= max(20_000, 50_000)  # never the whole tensor at once


@pytest.mark.parametrize("density", [0.01, 0.2, 0.9])
@pytest.mark.parametrize("kind", ["gaussian", "bf16_ties", "mostly_zero"])
def test_cuts_from_sample_and_from_histogram_match_sorting(kind, density):
    """The blocked top-k (threshold + tie cutoff) keeps exactly the sorted top k, ties
    to the lower index, whether the bracket comes from a sample or a histogram."""
    g = torch.Generator().manual_seed(5)
    n = 300_000
    x = torch.randn(n, generator=g)
    if kind == "bf16_ties":
        x = x.to(torch.bfloat16).float()
    elif kind == "mostly_zero":
        x[torch.rand(n, generator=g) < 0.95] = 0
    k = ops.magnitude_k(n, density)
    expected = reference_top_k_trim(x, k)
    scores = x.abs()
    for bracket in (ops.bracket_of_sample(scores[:: ops._sample_step(n)], n, k),
                    ops.bucket_bracket(torch.bincount(ops.high_bits(scores), minlength=1 << 15), k)):
        band = ops.BandCount(*bracket)
        for s in range(0, n, 7000):
            band.add(scores[s:s + 7000], s)
        cut = band.cut(k)
        assert cut is not None
        got = torch.cat([cut.trim_(x[s:s + 7000].clone(), s) for s in range(0, n, 7000)])
        assert torch.equal(got, expected)


def test_ties_large_against_dense_reference():
    """TIES on a tensor big enough for the fast paths, against a direct dense formula."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(400, 300, generator=g)
    taus = [0.1 * torch.randn(400, 300, generator=g) for _ in range(4)]
    weights = [1.0, 0.5, 2.0, 1.0]
    k = ops.magnitude_k(base.numel(), 0.2)
    trimmed = torch.stack([w * reference_top_k_trim(t, k) for w, t in zip(weights, taus)])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(trimmed) == sign
    w = torch.tensor(weights).reshape(-1, 1, 1)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    expected = base + 0.7 * (trimmed * agree).sum(0) / divisor
    got = run("ties", base, [base + t for t in taus], [{"weight": w_} for w_ in weights], density=0.2,
              **{"lambda": 0.7})
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# -- mergekit's newer methods: known answers on hand-sized tensors ------------------------
def test_nearswap_known_answer():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    expert = torch.tensor([0.05, 0.2, -1.0, 1.0])
    # w = clamp(t / |a - b|, 0, 1) with t = 0.1: 1 (swapped), 0.5, 0.1, 1 (equal entries)
    out = run("nearswap", base, [expert], t=0.1)
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1, 1.0]))


def test_ram_known_answer():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([3.0, 0.0, 0.0, 1e-6])  # 1e-6 is below epsilon: unchanged
    # entry 0 changed by both: mean 2; entry 1 only by a: kept whole; entries 2, 3: base
    torch.testing.assert_close(run("ram", base, [a, b]), torch.tensor([2.0, 2.0, 0.0, 0.0]))
    # ramplus_tl: a has 1 shared and 1 unique entry (rho 1, capped at alpha 0.2): its unique
    # entry is scaled by 1 + 0.1 * 0.2; b has no unique entry
    torch.testing.assert_close(run("ramplus_tl", base, [a, b]), torch.tensor([2.0, 2.0 * 1.02, 0.0, 0.0]))


def test_nuslerp_weights_pick_t():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.tensor([2**-0.5, 2**-0.5]))  # halfway along the arc
    out = run("nuslerp", None, [a, b], [{"weight": 0.0}, {"weight": 3.0}])
    torch.testing.assert_close(out, b)


def test_arcee_fusion_keeps_only_outlying_changes():
    base = torch.zeros(2, 8)
    expert = base.clone()
    expert[0] = 0.01
    expert[0, 3] = 5.0  # one large change in a row whose distribution moved
    out = run("arcee_fusion", base, [expert])
    expected = torch.zeros(2, 8)
    expected[0, 3] = 5.0
    torch.testing.assert_close(out, expected)
