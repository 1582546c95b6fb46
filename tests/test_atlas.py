"""aTLAS: learned per-expert, per-block task-vector coefficients."""

from __future__ import annotations

import pytest
import torch

from mergescale.rule_methods.atlas import (
    TaskVectorModel,
    answer_batch,
    learn_coefficients,
    line_search_coefficient,
    parameter_blocks,
)
from mergescale.models.llama import TinyShape, new_llama
from mergescale.tasks import ALPHABET, make_splits
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def base_and_experts():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention
    tokenizer = build_char_tokenizer(ALPHABET)
    shape = TinyShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    data = {t: make_splits(t, {"train": 300, "validation": 24, "test": 1}, seed=0)
            for t in ("first_letter", "last_letter")}
    quiet = lambda m: None  # noqa: E731
    model = new_llama(shape, tokenizer, seed=0)
    train(model, tokenizer, {t: d["train"] for t, d in data.items()},
          TrainConfig(steps=40, batch_size=32, loss_on="all"), log=quiet)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    experts = {}
    for task, d in data.items():
        model.load_state_dict(base, strict=False)
        train(model, tokenizer, {task: d["train"]}, TrainConfig(steps=30, batch_size=32, lr=3e-3), log=quiet)
        experts[task] = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_state_dict(base, strict=False)
    yield model, tokenizer, base, experts, data
    torch.set_num_threads(old)


def test_one_expert_one_block_learns_the_line_search_coefficient(base_and_experts):
    model, tokenizer, base, experts, data = base_and_experts
    tvm = TaskVectorModel(model, base, [experts["first_letter"]], blocking="model")
    batch = answer_batch(tokenizer, data["first_letter"]["validation"])
    lam_ls, loss_ls = line_search_coefficient(tvm, batch)
    learned = learn_coefficients(tvm, batch, steps=300, lr=0.05, init=0.3)
    assert learned.shape == (1, 1)
    with torch.no_grad():
        loss_gd = tvm.loss(learned, batch).item()
    assert learned.item() == pytest.approx(lam_ls, abs=0.02)
    assert loss_gd == pytest.approx(loss_ls, abs=1e-4)
    assert 0.2 < lam_ls < 2.5  # the expert helps: its task vector is worth adding


def test_per_tensor_coefficients_fit_at_least_as_well_as_one_coefficient(base_and_experts):
    model, tokenizer, base, experts, data = base_and_experts
    rows = data["first_letter"]["validation"] + data["last_letter"]["validation"]
    batch = answer_batch(tokenizer, rows)
    tvm = TaskVectorModel(model, base, list(experts.values()), blocking="tensor")
    assert len(tvm.blocks) == len(list(model.named_parameters()))
    _, loss_ls = line_search_coefficient(tvm, batch)
    learned = learn_coefficients(tvm, batch, steps=150, lr=0.05)
    with torch.no_grad():
        assert tvm.loss(learned, batch).item() <= loss_ls + 1e-3
    assert learned.shape == (2, len(tvm.blocks))


def test_parameter_blocks():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    block_of, blocks = parameter_blocks(names, "layer")
    assert blocks == ["other", "layer.0", "layer.1"]
    assert [block_of[n] for n in names] == [0, 1, 1, 2, 0]
    assert parameter_blocks(names, "model")[1] == ["model"]
    with pytest.raises(ValueError, match="blocks 'row'"):
        parameter_blocks(names, "row")


def test_expert_with_a_missing_tensor_is_named(base_and_experts):
    model, _, base, experts, _ = base_and_experts
    broken = dict(experts["first_letter"])
    broken.pop("lm_head.weight")
    with pytest.raises(ValueError, match="lm_head.weight"):
        TaskVectorModel(model, base, [broken], blocking="model")


def test_atlas_entries_are_rule_methods_checked_with_the_config():
    import copy
    from pathlib import Path

    import yaml

    from mergescale.config import ConfigError, check_schema, check_semantics
    from mergescale.rule_methods.registry import get_rule_method

    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    check_schema(config)
    methods = config["merge"]["methods"]
    assert methods["atlas"]["rule"] == "atlas" and methods["task_arithmetic_tuned"]["rule"] == "task_arithmetic_tuned"
    assert get_rule_method("atlas").resolve({}) == {"examples": 16, "blocks": "tensor", "steps": 100,
                                                     "lr": 0.05, "init": 0.3}
    assert get_rule_method("task_arithmetic_tuned").needs == ("validation_data",)
    bad = copy.deepcopy(config)
    bad["merge"]["methods"]["atlas"]["params"]["lr"] = 0
    with pytest.raises(ConfigError, match=r"merge.methods.atlas: params.lr=0.0 is outside \(0, inf\)"):
        check_semantics(bad)
    bad = copy.deepcopy(config)
    bad["merge"]["methods"]["atlas"]["bases"] = ["tiny-x"]
    with pytest.raises(ConfigError, match="merge.methods.atlas.bases"):
        check_semantics(bad)
