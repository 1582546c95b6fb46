"""The method registry: registration, lookup and hyperparameter validation."""

from __future__ import annotations

import pytest

import mergescale.merge as merge
from mergescale.merge import Hyperparameter, MergeInputError, get_method, list_methods, register_method
from mergescale.merge.registry import _METHODS


def test_every_method_file_registers_on_import():
    names = {m.name for m in list_methods()}
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"} <= names
    for m in list_methods():
        assert m.paper and m.description
        assert m.to_dict()["hyperparameters"] is not None


def test_unknown_method_lists_close_matches():
    with pytest.raises(MergeInputError, match=r"unknown merge method .tie. \(did you mean ties, dare_ties\?\)"):
        get_method("tie")


def test_collision_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_method(name="ties", needs_base=True, paper="-", description="-")(lambda *a: None)


def test_register_and_use_a_new_method():
    @register_method(
        name="_test_first",
        hyperparameters=[Hyperparameter("scale", "float", 1.0, "scale", low=0.0)],
        needs_base=False,
        paper="-",
        description="first expert, scaled",
    )
    def first(base, experts, expert_params, params, generator, name):
        return experts[0].float() * params["scale"]

    try:
        assert get_method("_test_first").function is first
        assert merge.validate_params("_test_first", {}).params == {"scale": 1.0}
    finally:
        del _METHODS["_test_first"]


def test_validate_fills_defaults_per_expert():
    r = merge.validate_params("ties", {"density": 0.3}, [{"weight": 2.0}, {"density": 0.5}])
    assert r.params == {"lambda": 1.0, "normalize": True, "rescale": False}
    assert r.expert_params == [{"weight": 2.0, "density": 0.3}, {"weight": 1.0, "density": 0.5}]


@pytest.mark.parametrize(
    "params, expert_params, match",
    [
        ({"densty": 0.2}, None, "densty is not a hyperparameter of ties \\(did you mean density\\?\\)"),
        ({"density": 0.0}, None, r"density=0.0 is outside \(0, 1\]"),
        ({"density": 1.5}, None, "density=1.5 is outside"),
        ({"normalize": "yes"}, None, "normalize: expected true/false"),
        ({"lambda": "big"}, None, "lambda: expected a number"),
        ({}, [{"lambda": 2.0}], r"experts\[0\].lambda.*global hyperparameter"),
        ({}, [{"density": -1}], r"experts\[0\].density=-1.0 is outside"),
        ({}, [{}, {}], "2 per-expert parameter sets given for 1 experts"),
    ],
)
def test_validate_rejects_with_key_named(params, expert_params, match):
    with pytest.raises(MergeInputError, match=match):
        merge.validate_params("ties", params, expert_params, n_experts=1)


def test_hyperparameter_with_invalid_default_fails_at_definition():
    with pytest.raises(MergeInputError):
        Hyperparameter("density", "float", 2.0, "bad", low=0.0, high=1.0)
