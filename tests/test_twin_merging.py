"""Twin-Merging: truncated SVD, the one-hot router property, per-input evaluation.

Experts are a tiny character-level Llama plus structured noise; the expected errors are
computed here from singular values (Eckart-Young), not taken from the implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_fixtures import load_state
from mergescale.models.llama import TinyShape, new_llama, save_model
from mergescale.tasks import get_family
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.rule_methods.twin_merging import (
    ROUTER_FILE, SHARED_DIR, TwinParams, build_twin, compress, load_parts,
    load_twin, materialize, reconstruct,
)
from mergescale.rule_methods.registry import resolve_params

TASKS = ["first_letter", "larger_number", "next_letter"]
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789 =,:\n") + [chr(c) for c in range(65, 91)]
SHAPE = TinyShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _save_expert(base_dir: Path, out: Path, seed: int) -> Path:
    """The base plus a rank-3 change of every matrix and noise on every vector."""
    from mergescale.models.llama import load_model

    model, tok = load_model(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                a, b = torch.randn(p.shape[0], 3, generator=g), torch.randn(3, p.shape[1], generator=g)
                p.add_(0.05 * a @ b / 3 + 0.002 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("twin")
    tok = build_char_tokenizer(ALPHABET)
    base = root / "base"
    save_model(new_llama(SHAPE, tok, seed=0), tok, base)
    experts = [_save_expert(base, root / f"expert{i}", seed=10 + i) for i in range(len(TASKS))]
    validation = []
    for task in TASKS:  # real prompts of each task: the router must tell them apart
        import random

        rng = random.Random(task)
        f = root / f"{task}.jsonl"
        f.write_text("".join(json.dumps(get_family(task).example(rng)) + "\n" for _ in range(40)))
        validation.append(f)
    return root, base, experts, validation


def _build(models, rank: int, name: str) -> tuple[Path, dict]:
    root, base, experts, validation = models
    out = root / name
    card = build_twin(base=base, experts=experts, tasks=TASKS, validation_files=validation, out_dir=out,
                      params=TwinParams(**resolve_params("twin_merging", {
                          "rank": rank, "shared_method": "task_arithmetic", "shared_params": {"lambda": 0.4},
                          "router_steps": 200})),
                      log_fn=lambda _: None)
    return out, card


@pytest.fixture(scope="module")
def low_rank(models):
    return _build(models, rank=2, name="twin-r2")


@pytest.fixture(scope="module")
def full_rank(models):
    return _build(models, rank=1000, name="twin-full")


def test_compress_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 12, generator=g)
    sigma = torch.linalg.svdvals(delta.double())
    for r in (1, 4, 12):
        error = torch.linalg.matrix_norm(reconstruct(compress(delta, r)).double() - delta.double())
        assert error == pytest.approx(float(sigma[r:].square().sum().sqrt()), abs=1e-4)
    vector = torch.randn(7, generator=g)
    assert torch.equal(reconstruct(compress(vector, 2)), vector)


def test_one_hot_router_reproduces_each_expert_up_to_truncation(models, low_rank):
    _, _, experts, _ = models
    out, _ = low_rank
    shared = load_state(out / SHARED_DIR)
    parts = load_parts(out / "exclusive.safetensors", len(experts))
    for j, expert_dir in enumerate(experts):
        expert = load_state(expert_dir)
        one_hot = [1.0 if i == j else 0.0 for i in range(len(experts))]
        merged = materialize(shared, parts, one_hot)
        for name, target in expert.items():
            error = float(torch.linalg.vector_norm(merged[name].double() - target.double()))
            if target.ndim == 2:  # Eckart-Young: the tail singular values of expert - shared
                sigma = torch.linalg.svdvals(target.double() - shared[name].double())
                bound = float(sigma[2:].square().sum().sqrt())
                assert error == pytest.approx(bound, rel=1e-3, abs=1e-5), name
                assert bound > 1e-3  # the test would say nothing if nothing were truncated
            else:
                assert error < 1e-5, name


def test_full_rank_one_hot_is_the_expert_exactly(models, full_rank):
    _, _, experts, _ = models
    out, _ = full_rank
    shared = load_state(out / SHARED_DIR)
    parts = load_parts(out / "exclusive.safetensors", len(experts))
    for j, expert_dir in enumerate(experts):
        merged = materialize(shared, parts, [float(i == j) for i in range(len(experts))])
        for name, target in load_state(expert_dir).items():
            torch.testing.assert_close(merged[name], target, atol=2e-5, rtol=0)


def test_per_input_forward_equals_each_rows_own_materialised_model(low_rank):
    """The hooks (low-rank linear/embedding, per-row norms) compute what materialising does."""
    from transformers import AutoModelForCausalLM

    out, _ = low_rank
    twin = load_twin(out)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(twin.tokenizer), (3, 9), generator=g)
    weights = torch.softmax(3 * torch.randn(3, len(TASKS), generator=g), -1)
    with torch.no_grad(), twin.routed.routed(weights):
        first = twin.model(input_ids=ids).logits  # norms row by row, then checked batched
        routed = twin.model(input_ids=ids).logits  # norms batched
    torch.testing.assert_close(first, routed, atol=1e-5, rtol=1e-5)
    shared = load_state(out / SHARED_DIR)
    parts = load_parts(out / "exclusive.safetensors", len(TASKS))
    reference = AutoModelForCausalLM.from_pretrained(out / SHARED_DIR, dtype=torch.float32).eval()
    for b in range(3):
        reference.load_state_dict(materialize(shared, parts, weights[b]))
        with torch.no_grad():
            expected = reference(input_ids=ids[b:b + 1]).logits
        torch.testing.assert_close(routed[b:b + 1], expected, atol=1e-4, rtol=1e-4)


def test_router_names_the_task_of_validation_prompts(low_rank):
    out, card = low_rank
    assert card["router_train_accuracy"] >= 0.9
    twin = load_twin(out)
    prompts = [get_family(t).prompt("bdf") for t in ("first_letter", "next_letter")]
    enc = twin.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    weights = twin.route(enc["input_ids"], enc["attention_mask"])
    assert weights.sum(-1).allclose(torch.ones(2))
    assert weights.argmax(-1).tolist() == [TASKS.index("first_letter"), TASKS.index("next_letter")]


def test_card_reports_storage_of_compressed_parts(models, low_rank):
    out, card = low_rank
    storage = card["storage_bytes"]
    assert storage["exclusive"] == sum(
        t.numel() * 4 for e in load_parts(out / "exclusive.safetensors", len(TASKS)) for p in e.values()
        for t in p.values())
    assert storage["exclusive"] < storage["exclusive_dense"] / 3  # rank 2 of 32-wide matrices
    written = json.loads((out / "merge_card.json").read_text())
    assert written["storage_bytes"] == storage and written["wall_time_s"] > 0
    assert json.loads((out / "model_spec.json").read_text())["model"] == "mergescale-twin"


def _generate(lm, prompts):
    from lm_eval.api.instance import Instance

    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    return lm.generate_until(requests)


def test_registered_lm_eval_class_generates_like_the_expert(models, full_rank, tmp_path):
    """Through lm-eval's own batching: a router fixed on expert 1 at full rank is expert 1."""
    from lm_eval.models.huggingface import HFLM

    from mergescale.evaluate.spec_models import load_spec_model

    _, _, experts, _ = models
    out, _ = full_rank
    import shutil

    forced = tmp_path / "forced"
    shutil.copytree(out, forced)
    k, hidden = len(TASKS), SHAPE.hidden_size
    save_file({"linear.weight": torch.zeros(k, hidden), "linear.bias": torch.tensor([0.0, 60.0, 0.0]),
               "mean": torch.zeros(hidden), "std": torch.ones(hidden)}, str(forced / ROUTER_FILE))
    prompts = [get_family(t).prompt(x) for t in TASKS for x in ("abc", "12,47", "qz")]
    twin_out = _generate(load_spec_model(forced, batch_size=4), prompts)
    expert = HFLM(pretrained=str(experts[1]), device="cpu", batch_size=4, dtype="float32")
    assert twin_out == _generate(expert, prompts)
    shared = HFLM(pretrained=str(out / SHARED_DIR), device="cpu", batch_size=4, dtype="float32")
    assert twin_out != _generate(shared, prompts)  # the routing changed the model


def test_bad_params_name_the_key():
    from mergescale.merge import MergeInputError
    from mergescale.rule_methods.registry import resolve_params

    with pytest.raises(MergeInputError, match=r"merge.methods.tw.params.rank=0 is outside"):
        resolve_params("twin_merging", {"rank": 0}, "merge.methods.tw.params.")
    with pytest.raises(MergeInputError, match=r"params.shared_method: 'slerp' is not one of"):
        resolve_params("twin_merging", {"shared_method": "slerp"}, "params.")
    with pytest.raises(MergeInputError, match=r"params.shared_params: .*density=3"):
        resolve_params("twin_merging", {"shared_params": {"density": 3}}, "params.")
    with pytest.raises(MergeInputError, match=r"params.rnak is not a hyperparameter of rule-method twin_merging"):
        resolve_params("twin_merging", {"rnak": 2}, "params.")
    with pytest.raises(MergeInputError, match=r"params.shared_params: expected a mapping"):
        resolve_params("twin_merging", {"shared_params": 0.2}, "params.")
    defaults = resolve_params("twin_merging", {})
    assert TwinParams(**defaults).shared_params == {"density": 0.2, "lambda": 1.0}
