"""Config entries naming a method rule (`rule:`): checked before any job runs."""

import copy
from pathlib import Path

import pytest
import yaml

from mergescale.config import ConfigError, check_schema, check_semantics
from mergescale.rule_methods.registry import resolve_params

DEFAULT = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())


def _check(methods_update):
    config = copy.deepcopy(DEFAULT)
    config["merge"]["methods"].update(methods_update)
    check_schema(config)
    check_semantics(config)


def test_default_config_names_both_rule_methods():
    rules = {spec.get("rule") for spec in DEFAULT["merge"]["methods"].values()}
    assert {"opcm", "map"} <= rules
    _check({})


@pytest.mark.parametrize("entry, message", [
    ({"rule": "opcm", "params": {"alpha": 1.5}}, r"merge.methods.x: params.alpha=1.5 is outside"),
    ({"rule": "opcm", "params": {"order": 2}}, r"merge.methods.x: params.order is not a hyperparameter of rule-method opcm \(did you mean orders\?\)"),
    ({"rule": "map", "params": {"front_points": 0}}, r"merge.methods.x: params.front_points=0"),
    ({"rule": "mpa"}, r"merge.methods.x.rule: no rule-method .mpa. \(did you mean map\?\); registered: .*opcm"),
    ({"rule": "opcm", "method": "linear"}, r"merge.methods.x"),  # one of method / rule
    # Twin-Merging's flat params by the shared checker, its nested ones by its own check
    ({"rule": "twin_merging", "params": {"rank": 0}}, r"merge.methods.x: params.rank=0 is outside \[1, inf\)"),
    ({"rule": "twin_merging", "params": {"shared_method": "slerp"}},
     r"merge.methods.x: params.shared_method: 'slerp' is not one of \['task_arithmetic', 'ties'\]"),
    ({"rule": "atlas", "params": {"blocks": "row"}}, r"merge.methods.x: params.blocks: 'row' is not one of"),
    ({"rule": "twin_merging", "params": {"shared_params": {"density": 3}}},
     r"merge.methods.x: params.shared_params: density=3"),
])
def test_bad_rule_entries_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        _check({"x": entry})


def test_defaults_fill_in():
    assert resolve_params("opcm", {}) == {"alpha": 0.5, "orders": 2, "baseline_lambda": 0.5}
    assert resolve_params("map", {"grid": 5})["grid"] == 5
    twin = resolve_params("twin_merging", {"rank": 4})
    assert twin["rank"] == 4 and twin["shared_method"] == "ties" and twin["router_steps"] == 300
