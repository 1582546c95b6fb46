"""Every registered method honours the per-tensor contract and runs through the engine."""

from __future__ import annotations

import json

import pytest
import torch

from merge_fixtures import load_state, save_tiny_llama
from mergescale.merge import MergeRequest, get_method, list_methods, run_merge, validate_params
from mergescale.merge.ops import tensor_seed

METHODS = [m.name for m in list_methods() if not m.name.startswith("_")]
NAME = "model.layers.1.mlp.up_proj.weight"


def n_experts(method) -> int:
    return min(max(method.min_experts, 3), method.max_experts or 3)


# What data-aware methods learn before streaming (tests/test_merge_data_aware.py fits them).
FITTED = {"adamerging": lambda k: {"coefficients": [1.0] * k},
          "adamerging_layerwise": lambda k: {"coefficients": {NAME: [1.0] * k}},
          "greedy_soup": lambda k: {"soup_weights": [1.0] * k},
          "localize_stitch": lambda k: {"mask_files": []}}  # dataless masks


def fake_stats(method, experts):
    """Positive Fisher diagonals and positive definite Gram matrices per expert."""
    g = torch.Generator().manual_seed(2)
    out = []
    for x in experts:
        entry = {}
        if "fisher" in method.stats:
            entry["fisher"] = torch.rand(x.shape, generator=g)
        if "gram" in method.stats:
            a = torch.randn(2 * x.shape[-1], x.shape[-1], generator=g)
            entry["gram"] = a.T @ a
        out.append(entry)
    return out


def call(method, base, experts, seed=0):
    resolved = validate_params(method, {}, None, n_experts=len(experts))
    params = dict(resolved.params)
    if method.setup is not None:
        params.update(method.setup([NAME, "model.layers.3.mlp.up_proj.weight"], None))
    if method.name in FITTED:
        params.update(FITTED[method.name](len(experts)))
    extra = {"stats": fake_stats(method, experts)} if method.stats else {}
    gen = torch.Generator().manual_seed(tensor_seed(seed, NAME)) if method.randomised else None
    return method.function(base, experts, resolved.expert_params, params, gen, NAME, **extra)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract(name, dtype):
    method = get_method(name)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=g).to(dtype)
    experts = [(base.float() + 0.1 * torch.randn(48, 40, generator=g)).to(dtype) for _ in range(n_experts(method))]
    base_in = base if method.uses_base else None
    snapshot = [x.clone() for x in experts] + [base.clone()]
    out = call(method, base_in, experts)
    assert out.dtype == torch.float32 and out.shape == base.shape
    assert torch.isfinite(out).all()
    # inputs are never modified in place
    assert all(torch.equal(a, b) for a, b in zip(snapshot, experts + [base]))
    # same generator seed, same result
    assert torch.equal(out, call(method, base_in, experts))


# What merging k copies of one fine-tune gives with default hyperparameters:
# "expert" (averages), "sum" (task vectors added, not averaged), or None (no simple form).
IDENTICAL = {
    "linear": "expert", "ties": "expert", "della": "expert", "model_stock": "expert",
    "multislerp": "expert", "karcher": "expert", "magmax": "expert", "sce": "expert",
    "layer_swap": "expert", "passthrough": "expert",
    "task_arithmetic": "sum", "dare_linear": "sum", "dare_ties": "sum", "breadcrumbs": "sum",
    "breadcrumbs_ties": "sum", "della_linear": "sum", "consensus": "sum",
    "iso_c": "flattened sum",
    "slerp": None,  # halfway between base and expert
    "pcb": None,  # keeps only the top 10% of entries
    "tsv": None,  # each copy keeps rank/k triplets of the same matrix
    "localize_stitch": None,  # every copy keeps the same 10% of the entries
    "fisher": "expert", "regmean": "expert", "regmean_plus_plus": "expert", "greedy_soup": "expert",
    "adamerging": "sum", "adamerging_layerwise": "sum",  # with every lambda = 1
    "nuslerp": "expert", "ram": "expert", "ramplus_tl": "expert",
    "arcee_fusion": None,  # keeps only the outlying changes
    "nearswap": None,  # moves each entry by t / distance
}


def test_identical_table_covers_every_method():
    assert set(IDENTICAL) >= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_identical_experts(name):
    method = get_method(name)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 12, generator=g)
    expert = base + 0.1 * torch.randn(16, 12, generator=g)
    k = n_experts(method)
    out = call(method, base if method.uses_base else None, [expert.clone() for _ in range(k)])
    kind = IDENTICAL[name]
    if kind is None:
        pytest.skip(f"{name} has no closed form for identical experts")
    if kind == "expert":
        expected = expert
    elif kind == "sum":
        expected = base + k * (expert - base)
    else:
        u, s, vh = torch.linalg.svd(k * (expert - base), full_matrices=False)
        expected = base + (u * s.mean()) @ vh
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_llama(root / "base", 0, max_shard_size="1GB")
    return base, [save_tiny_llama(root / f"e{i}", 10 + i, like=base, max_shard_size="1GB") for i in range(3)]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_through_the_engine(tiny, tmp_path, name):
    from transformers import AutoModelForCausalLM

    method = get_method(name)
    if method.stats or method.needs_data:
        pytest.skip("data-aware: run through the engine with real statistics in test_merge_data_aware.py")
    base, experts = tiny
    experts = experts[: n_experts(method)]
    out = tmp_path / name
    result = run_merge(MergeRequest(method=name, base=base if method.needs_base else None, experts=experts,
                                    out_dir=out, dtype="bfloat16", seed=1))
    assert result.card["method"] == name
    assert json.loads((out / "merge_card.json").read_text())["n_tensors"] == len(load_state(base))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
