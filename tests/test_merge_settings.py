"""mergekit's parameter settings: gradients over layers and filtered values."""

from __future__ import annotations

import pytest

from mergescale.merge.errors import MergeInputError
from mergescale.merge.ops import layer_index, with_layer_index
from mergescale.merge.settings import check_setting, evaluate_setting, resolve


def test_gradient_interpolates_between_neighbouring_points():
    g = check_setting([0.0, 1.0, 0.0], "t")
    assert [evaluate_setting(g, "x", t) for t in (0, 0.25, 0.5, 0.75, 1)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_boolean_gradient_takes_the_point_at_or_below():
    g = check_setting([True, False], "normalize")
    assert [evaluate_setting(g, "x", t) for t in (0, 0.99, 1)] == [True, True, False]


def test_first_matching_filter_wins_and_unmatched_falls_through():
    s = check_setting([{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.2}], "t")
    assert evaluate_setting(s, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(s, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.2
    assert evaluate_setting(s, "model.norm.weight", 0.5) is None
    # an unmatched setting leaves the value to the next scope (mergekit's precedence)
    assert resolve([{"t": s}, {"t": 0.9}], "model.norm.weight", 0.5) == {"t": 0.9}
    assert resolve([{"t": s}, {"t": 0.9}], "model.layers.1.mlp.x", 0.5) == {"t": 0.2}


@pytest.mark.parametrize("value, match", [
    ([], "t: expected a value"),
    ([{"filter": 3, "value": 1}], r"t\[0\].filter: expected a string"),
    ([{"value": [[1]]}], r"t\[0\].value: expected a value or a list"),
    ({"filter": "mlp"}, r"t\[0\]: expected a mapping with 'value'"),
])
def test_malformed_settings_name_the_key(value, match):
    with pytest.raises(MergeInputError, match=match):
        check_setting(value, "t")


def test_with_layer_index_renumbers_the_block_only():
    assert with_layer_index("model.layers.3.mlp.up_proj.weight", 11) == "model.layers.11.mlp.up_proj.weight"
    assert with_layer_index("model.norm.weight", 2) == "model.norm.weight"
    assert layer_index("layers.0.attention.wq.weight") == 0 and layer_index("transformer.h.7.mlp.c_fc.weight") == 7
