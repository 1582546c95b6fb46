"""The compiled task-arithmetic kernel (mergescale.merge.compiled) against the torch
form it replaces: the same merged tensors, bit for bit."""

from __future__ import annotations

import pytest
import torch

from mergescale.merge import get_method, compiled, validate_params
from mergescale.merge.methods import task_arithmetic
from mergescale.merge.ops import TensorSource

pytestmark = pytest.mark.skipif(compiled.numba is None, reason="numba is not installed")


def merge(method, base, experts, form, monkeypatch, threads=2, expert_params=None, **params):
    """The merged float32 tensor from `form` ("numba" or "torch")."""
    monkeypatch.setenv("MERGESCALE_MERGE_KERNEL", form)
    m = get_method(method)
    resolved = validate_params(m, params, expert_params, n_experts=len(experts))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return m.function(base, experts, resolved.expert_params, resolved.params, None, "w")
    finally:
        torch.set_num_threads(old)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (signed zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def task_vectors(n, k, dtype, seed, ties=False, zero_expert=False, negative_zeros=False):
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(n, generator=g)
    experts = [base + 0.002 * torch.randn(n, generator=g) for _ in range(k)]
    if ties:  # few distinct magnitudes: many entries share the threshold exactly
        experts = [base + 0.001 * torch.randint(-3, 4, (n,), generator=g).float() for _ in range(k)]
    if zero_expert:
        experts[0] = base.clone()
    if negative_zeros:  # -0 in the base and in a task vector (-0 - +0)
        base[::7] = -0.0
        base[3::11] = 0.0
        experts[-1][3::11] = -0.0
    return base.to(dtype), [e.to(dtype) for e in experts]


CASES = [
    # (elements, experts, dtype, magnitude ties)
    (1, 2, torch.bfloat16, False),
    (4099, 3, torch.bfloat16, False),
    (4099, 3, torch.bfloat16, True),
    (70001, 4, torch.float32, False),
    (70001, 2, torch.float32, True),
    (70001, 4, torch.bfloat16, True),
]


@pytest.mark.parametrize("n,k,dtype,ties", CASES)
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_ties_kernel_equals_torch_form(n, k, dtype, ties, density, monkeypatch):
    base, experts = task_vectors(n, k, dtype, seed=n + k, ties=ties)
    ours = merge("ties", base, experts, "numba", monkeypatch, density=density)
    ref = merge("ties", base, experts, "torch", monkeypatch, density=density)
    assert identical(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_kernel_zero_task_vectors_and_signed_zeros(dtype, monkeypatch):
    base, experts = task_vectors(9000, 3, dtype, seed=3, zero_expert=True, negative_zeros=True)
    for density in (0.1, 0.5, 1.0):
        ours = merge("ties", base, experts, "numba", monkeypatch, density=density)
        assert identical(ours, merge("ties", base, experts, "torch", monkeypatch, density=density))
    same = [base.clone(), base.clone()]  # every task vector zero: the base comes back
    assert identical(merge("ties", base, same, "numba", monkeypatch, density=0.2),
                     merge("ties", base, same, "torch", monkeypatch, density=0.2))


@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_result_does_not_depend_on_threads(threads, monkeypatch):
    base, experts = task_vectors(50001, 3, torch.bfloat16, seed=5, ties=True)
    ours = merge("ties", base, experts, "numba", monkeypatch, threads=threads, density=0.3)
    assert identical(ours, merge("ties", base, experts, "torch", monkeypatch, density=0.3))


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("task_arithmetic", {"normalize": True}),
    ("ties", {"lambda": 0.7, "rescale": True}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.01, "lambda": 1.3}),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_methods_and_uneven_weights(method, params, dtype, monkeypatch):
    base, experts = task_vectors(33333, 3, dtype, seed=7, ties=True, negative_zeros=True)
    expert_params = [{"weight": 0.3}, {"weight": 1.0}, {"weight": 0.55}]
    if "density" not in params and method == "ties":
        expert_params = [{**p, "density": d} for p, d in zip(expert_params, (0.1, 0.5, 1.0))]
    for ep in (expert_params, None):  # uneven weights, then the defaults (equal)
        ours = merge(method, base, experts, "numba", monkeypatch, expert_params=ep, **params)
        assert identical(ours, merge(method, base, experts, "torch", monkeypatch, expert_params=ep, **params))


def test_float16_and_mixed_dtypes_go_through_float32(monkeypatch):
    base, experts = task_vectors(10007, 2, torch.float16, seed=11, ties=True)
    assert identical(merge("ties", base, experts, "numba", monkeypatch, density=0.2),
                     merge("ties", base, experts, "torch", monkeypatch, density=0.2))
    mixed = [experts[0].to(torch.bfloat16), experts[1].float()]
    assert identical(merge("ties", base.float(), mixed, "numba", monkeypatch, density=0.2),
                     merge("ties", base.float(), mixed, "torch", monkeypatch, density=0.2))


@pytest.mark.parametrize("bracket_misses", [False, True])
def test_streamed_pieces_equal_the_whole(bracket_misses, monkeypatch):
    """Read by ranges (as a tensor on disk is), with ranges smaller than the tensor; the
    cuts from the sampled bracket, or from the radix select when the bracket misses."""
    if bracket_misses:
        monkeypatch.setattr(compiled, "_bracket", lambda sample, n, k: (0x7F000000, 0x7F000000))
    monkeypatch.setattr(task_arithmetic, "READ_ELEMENTS", 4096)
    base, experts = task_vectors(20000, 3, torch.bfloat16, seed=13, ties=True)
    m = get_method("ties")
    resolved = validate_params(m, {"density": 0.2}, None, n_experts=3)
    monkeypatch.setenv("MERGESCALE_MERGE_KERNEL", "numba")
    sources = [TensorSource(t) for t in [base, *experts]]
    pieces = [p.clone() for _, _, p in m.blocks(sources[0], sources[1:], resolved.expert_params, resolved.params,
                                                 None, "w")]
    whole = merge("ties", base, experts, "torch", monkeypatch, density=0.2)
    assert identical(torch.cat(pieces), whole)


def test_the_decision(monkeypatch):
    monkeypatch.delenv("MERGESCALE_MERGE_KERNEL", raising=False)
    sp = lambda kind: task_arithmetic._Sparsifier(kind, {"density": 0.5, "gamma": 0.01, "epsilon": 0.1},  # noqa: E731
                                                  False, 10, None)
    src = [TensorSource(torch.zeros(10, dtype=torch.bfloat16))]
    cpu = torch.device("cpu")
    assert compiled.compiled_merge_applies([sp("magnitude"), sp("outliers"), sp(None)], "sum", src, cpu)
    assert not compiled.compiled_merge_applies([sp("random")], "sum", src, cpu)  # draws stay torch's
    assert not compiled.compiled_merge_applies([sp("magnitude")], "count", src, cpu)
    assert not compiled.compiled_merge_applies([sp("magnitude")], "sum", src, torch.device("meta"))
    monkeypatch.setenv("MERGESCALE_MERGE_KERNEL", "torch")
    assert not compiled.compiled_merge_applies([sp("magnitude")], "sum", src, cpu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_count_non_finite(dtype, monkeypatch):
    t = torch.randn(5003).to(dtype)
    assert compiled.count_non_finite(t) == 0
    t[[3, 100, 5002]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    assert compiled.count_non_finite(t) == 3
    monkeypatch.setenv("MERGESCALE_MERGE_KERNEL", "torch")  # the torch fallback counts the same
    assert compiled.count_non_finite(t) == 3


def test_bfloat16_cast_equals_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100003, generator=g) * torch.logspace(-44, 38, 100003)  # subnormals to near max
    x[::97], x[1::97] = 0.0, -0.0
    x[:4] = torch.tensor([float("inf"), -float("inf"), 3.4e38, 1e-45])
    assert torch.equal(compiled.to_dtype(x, torch.bfloat16).view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert compiled.to_dtype(x, torch.float16).dtype == torch.float16  # other casts are torch's


def test_without_numba_everything_is_torch(monkeypatch):
    """Where numba does not import, the merge, the NaN/Inf count and the cast are torch's."""
    monkeypatch.delenv("MERGESCALE_MERGE_KERNEL", raising=False)
    base, experts = task_vectors(5000, 2, torch.bfloat16, seed=17, ties=True)
    with_numba = merge("ties", base, experts, "numba", monkeypatch, density=0.2)
    monkeypatch.setattr(compiled, "numba", None)
    monkeypatch.setattr(compiled, "merge_ranges", None)  # would fail if reached
    assert not compiled.available()
    assert identical(merge("ties", base, experts, "numba", monkeypatch, density=0.2), with_numba)
    assert compiled.count_non_finite(torch.tensor([1.0, float("nan")])) == 1
    assert compiled.to_dtype(torch.ones(3), torch.bfloat16).dtype == torch.bfloat16
