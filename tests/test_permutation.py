"""Permutation symmetries of a Llama, weight matching, PLeaS and loss barriers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mergescale.studies.cross_seed.barrier import BarrierPair, barrier_curves, barrier_heights, interpolate
from mergescale.studies.cross_seed.merge import merge_cross_seed, text_batches
from mergescale.models.llama import TinyShape, load_model, new_llama, save_model
from mergescale.studies.cross_seed.permutation import (
    PermutationSpecError,
    apply_permutation,
    identity_perms,
    inverse,
    llama_permutation_spec,
    random_perms,
    weight_matching,
)
from mergescale.studies.cross_seed.pleas import least_squares_merge
from mergescale.tasks import ALPHABET, make_splits
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.training.loop import TrainConfig, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation (20x slower on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def llama(kv_heads: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=40,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a wrong norm permutation shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def permuted_copy(model: LlamaForCausalLM, seed: int):
    state = model.state_dict()
    spec = llama_permutation_spec(model.config, list(state))
    perms = random_perms(spec, seed)
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(apply_permutation(state, spec, perms))
    return copy, spec, perms


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_permuted_llama_computes_the_same_function(kv_heads):
    model = llama(kv_heads)
    copy, spec, perms = permuted_copy(model, seed=1)
    assert set(spec.sizes) == {"res", "heads.0", "heads.1", "mlp.0", "mlp.1"}
    assert spec.sizes["heads.0"] == kv_heads
    assert all(not torch.equal(p, torch.arange(len(p))) for g, p in perms.items() if len(p) > 2)
    ids = torch.randint(0, 40, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits, copy(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # the weights did move: the copy is not the original
    assert not torch.equal(copy.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_permuting_dims_within_a_head_breaks_rope():
    """Why heads move only as wholes: a within-head permutation of q and k changes the
    function, because RoPE rotates fixed pairs of dimensions."""
    model = llama(4)
    state = model.state_dict()
    head_dim = 8
    inner = torch.randperm(head_dim, generator=torch.Generator().manual_seed(3))
    idx = (torch.arange(4)[:, None] * head_dim + inner).reshape(-1)
    for proj in ("q_proj", "k_proj"):
        key = f"model.layers.0.self_attn.{proj}.weight"
        state[key] = state[key][idx]
    broken = LlamaForCausalLM(model.config).eval()
    broken.load_state_dict(state)
    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (broken(ids).logits - model(ids).logits).abs().max() > 1e-3


def test_norm_weight_must_move_with_the_residual_stream():
    """RMSNorm is equivariant only if its (elementwise) weight is permuted too."""
    model = llama(4)
    state = model.state_dict()
    spec = llama_permutation_spec(model.config, list(state))
    perms = random_perms(spec, 5)
    permuted = apply_permutation(state, spec, perms)
    key = "model.layers.0.input_layernorm.weight"
    assert torch.equal(permuted[key], state[key][perms["res"]])
    permuted[key] = state[key]  # leave this norm's weight unpermuted
    wrong = LlamaForCausalLM(model.config).eval()
    wrong.load_state_dict(permuted)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (wrong(ids).logits - model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_weight_matching_recovers_a_known_permutation(kv_heads):
    model = llama(kv_heads)
    copy, spec, perms = permuted_copy(model, seed=2)
    found = weight_matching(spec, model.state_dict(), copy.state_dict())
    for group, perm in inverse(perms).items():
        assert torch.equal(found[group], perm), group
    matched = apply_permutation(copy.state_dict(), spec, found)
    for name, tensor in model.state_dict().items():
        assert torch.equal(matched[name], tensor), name


def test_weight_matching_of_a_model_with_itself_is_the_identity():
    model = llama(4)
    state = model.state_dict()
    spec = llama_permutation_spec(model.config, list(state))
    found = weight_matching(spec, state, state)
    for group, perm in identity_perms(spec).items():
        assert torch.equal(found[group], perm)


def test_spec_rejects_unknown_tensors_and_bad_permutations():
    model = llama(4)
    names = list(model.state_dict()) + ["model.layers.0.mystery.weight"]
    with pytest.raises(PermutationSpecError, match="mystery"):
        llama_permutation_spec(model.config, names)
    spec = llama_permutation_spec(model.config, list(model.state_dict()))
    perms = identity_perms(spec)
    perms["mlp.0"] = torch.zeros(48, dtype=torch.long)
    with pytest.raises(PermutationSpecError, match="mlp.0"):
        apply_permutation(model.state_dict(), spec, perms)


def test_pleas_known_answer_on_a_two_layer_mlp():
    """Layer 1 sees the same inputs in every model, so its least-squares solution is the
    average; layer 2's is the least-squares fit, on the merged model's hidden units, of
    the average of the models' outputs. Computed here with numpy."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double() for _ in range(2)]
    x = torch.randn(200, 5, dtype=torch.float64)
    merged = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p, *ps in zip(merged.parameters(), *(m.parameters() for m in models)):
            p.copy_(sum(ps) / 2)
    batches = [({"input": x[:120]}, None), ({"input": x[120:]}, None)]
    least_squares_merge(merged, models, ["0", "2"], batches, ridge=0.0)

    xs = x.numpy()
    w = [[p.detach().numpy() for p in m.parameters()] for m in models]  # W1, b1, W2, b2
    w1 = (w[0][0] + w[1][0]) / 2
    b1 = (w[0][1] + w[1][1]) / 2
    hidden = np.tanh(xs @ w1.T + b1)
    target = sum(np.tanh(xs @ wi[0].T + wi[1]) @ wi[2].T + wi[3] for wi in w) / 2
    design = np.hstack([hidden, np.ones((len(xs), 1))])
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(merged[0].weight.detach().numpy(), w1, atol=1e-8)
    np.testing.assert_allclose(merged[0].bias.detach().numpy(), b1, atol=1e-8)
    np.testing.assert_allclose(merged[2].weight.detach().numpy(), solution[:-1].T, atol=1e-8)
    np.testing.assert_allclose(merged[2].bias.detach().numpy(), solution[-1], atol=1e-8)


@pytest.fixture(scope="module")
def char_models(tmp_path_factory):
    """Two tiny character Llamas from different seeds, and a permuted copy of the first."""
    root = tmp_path_factory.mktemp("cross")
    tokenizer = build_char_tokenizer(ALPHABET)
    shape = TinyShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    paths = {}
    rows = {"first_letter": _rows(200)}
    for name, seed in (("a", 0), ("b", 1)):
        paths[name] = root / name
        model = new_llama(shape, tokenizer, seed=seed)
        # briefly trained: a random-init Llama predicts near-uniform logits, whatever its weights
        train(model, tokenizer, rows, TrainConfig(steps=30, batch_size=16, seed=seed, loss_on="all"),
              log=lambda m: None)
        save_model(model, tokenizer, paths[name])
    model, _ = load_model(paths["a"])
    copy, _, _ = permuted_copy(model, seed=4)
    paths["a_permuted"] = root / "a_permuted"
    save_model(copy, tokenizer, paths["a_permuted"])
    return root, paths, tokenizer


def _rows(n=32):
    return make_splits("first_letter", {"train": 1, "validation": n, "test": 1}, seed=0)["validation"]


def test_cross_seed_weight_matching_undoes_a_permutation(char_models):
    root, paths, tokenizer = char_models
    card = merge_cross_seed("weight_matching", [paths["a"]], [paths["a_permuted"]], root / "wm", log=lambda m: None)
    merged, _ = load_model(root / "wm")
    original, _ = load_model(paths["a"])
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, atol=1e-7, rtol=0)
    assert json.loads((root / "wm" / "merge_card.json").read_text())["method"] == "cross_seed_weight_matching"
    assert card["permutation_sizes"]["res"] == 32
    # without matching, the average of a model and its permuted copy is a different model
    merge_cross_seed("average", [paths["a"]], [paths["a_permuted"]], root / "avg", log=lambda m: None)
    naive, _ = load_model(root / "avg")
    assert (naive.model.layers[0].mlp.up_proj.weight - original.model.layers[0].mlp.up_proj.weight).abs().max() > 1e-3


def test_cross_seed_pleas_runs_and_fits_layers(char_models):
    root, paths, tokenizer = char_models
    rows = _rows()
    card = merge_cross_seed("pleas", [paths["a"]], [paths["b"]], root / "pleas", rows=rows,
                            batch_size=16, log=lambda m: None)
    residuals = card["pleas_relative_residuals"]
    assert len(residuals) == 2 * 7 + 1  # 7 linears per layer, and lm_head
    assert all(0 <= r < 1 for r in residuals.values())
    merged, _ = load_model(root / "pleas")
    batches = text_batches(tokenizer, rows, 16)
    with torch.no_grad():
        assert torch.isfinite(merged(**batches[0][0]).logits).all()


def test_barrier_endpoints_and_matching(char_models):
    root, paths, tokenizer = char_models
    pair = BarrierPair("bases", paths["a"], paths["b"], _rows(24), "all")
    curves = barrier_curves(pair, [0.0, 0.5, 1.0], score=None, log=lambda m: None)
    assert len(curves) == 6
    naive = curves[~curves.matched].set_index("alpha").loss
    matched = curves[curves.matched].set_index("alpha").loss
    # the end points are the same functions before and after matching
    assert naive[0.0] == pytest.approx(matched[0.0], abs=1e-6)
    assert naive[1.0] == pytest.approx(matched[1.0], abs=1e-5)
    heights = barrier_heights(curves)
    assert set(heights.matched) == {False, True}
    # a model and its permuted copy: the matched path is constant, the naive one is not
    copy_pair = BarrierPair("copy", paths["a"], paths["a_permuted"], _rows(24), "all")
    copy_curves = barrier_curves(copy_pair, [0.0, 0.5, 1.0], score=None, log=lambda m: None)
    h = barrier_heights(copy_curves).set_index("matched").loss_barrier
    assert h[True] == pytest.approx(0.0, abs=1e-5)
    assert h[False] > 1e-4


def test_interpolate_end_points():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.ones(3)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.25)["w"], torch.full((3,), 0.25))


def _config():
    import yaml
    from pathlib import Path

    return yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())


def test_cross_seed_plan_from_the_default_config():
    from mergescale.tasks.combos import expert_subsets
    from mergescale.studies.cross_seed.plan import cross_seed_plan

    config = _config()
    combos = expert_subsets(config["tasks"]["held_in"], config["merge"]["ks"],
                            config["merge"]["subsets_per_k"], config["seed"])
    plan = cross_seed_plan(config, combos)
    assert set(plan.combos) == {c for c in combos if c.startswith("k2")}
    for combo, (tasks_a, tasks_b) in plan.combos.items():
        assert tasks_a + tasks_b == combos[combo][0::2] + combos[combo][1::2]
        experts_a, experts_b = plan.experts(combo)
        assert experts_a == [f"results/experts/tiny-s/{t}" for t in tasks_a]
        assert experts_b == [f"results/experts/tiny-s-seed1/{t}" for t in tasks_b]
    assert "merged/tiny-s/cross_pleas/k2s0" in plan.model_dirs()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["bases"]["tiny-s-seed1"]["pretrain"].update(seed=0), "cross_seed.base_b: .* another seed"),
    (lambda c: c["cross_seed"].update(base_b="tiny-x"), "cross_seed.base_b: 'tiny-x' is not in bases"),
    (lambda c: c["cross_seed"].update(ks=[3]), "cross_seed.ks: k=3 is not in merge.ks"),
    (lambda c: c["bases"]["tiny-s-seed1"]["shape"].update(hidden_size=32), "must have the shape"),
    (lambda c: c["cross_seed"]["barrier"].update(alphas=[0.0, 0.5]), "must include 0 and 1"),
    (lambda c: c["cross_seed"]["barrier"].update(expert_tasks=["min_digit"]), "not a held-in task"),
])
def test_cross_seed_config_errors_name_the_key(edit, message):
    from mergescale.config import ConfigError
    from mergescale.studies.cross_seed.plan import cross_seed_plan

    config = _config()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        cross_seed_plan(config, {"k2s0": ["first_letter", "last_letter"]})
