"""What a tuned merge method searches: its grid of hyperparameter values.

The config's own grid if it gives one, else the registered grids (``Hyperparameter.grid``)
of the hyperparameters the config does not fix. Imports only the merge registry, so the
config check can ask for a search space without loading the evaluator.
"""

from __future__ import annotations

import itertools
from typing import Any

from mergescale.merge import get_method
from mergescale.merge.errors import MergeInputError

ONE_OVER_K = "1/k"  # a grid value: 1 / (number of merged experts), plain averaging's lambda


def _grid_value(value, k: int | None):
    if value == ONE_OVER_K:
        return round(1 / (k or 2), 4)  # without k (config check): any k stands in
    return value


def search_space(method_name: str, tune: bool | dict, fixed: dict | None = None,
                 k: int | None = None) -> dict[str, list]:
    """{hyperparameter: values}: the config's grid if given, else the registered grids of
    the hyperparameters the config does not fix.

    A value "1/k" stands for 1 / (number of merged experts); a registered lambda grid
    gains it, so a tuned task-vector method can always reach plain averaging's scale
    (task arithmetic with lambda = 1/k is the average of the experts)."""
    method = get_method(method_name)
    fixed = fixed or {}
    if isinstance(tune, dict):
        space = {}
        for name, values in tune.items():
            hp = method.hyperparameter(name)
            if hp is None:
                raise MergeInputError(f"tune.{name}: {method_name} has no hyperparameter {name!r}")
            checked = [hp.check(_grid_value(v, k), where="tune") for v in values]
            space[name] = list(dict.fromkeys(checked))  # 1/k may equal a listed value
        return space
    space = {hp.name: list(hp.grid) for hp in method.hyperparameters
             if hp.grid and hp.name not in fixed}
    if "lambda" in space:
        space["lambda"] = list(dict.fromkeys([_grid_value(ONE_OVER_K, k), *space["lambda"]]))
    if not space:
        raise MergeInputError(
            f"{method_name} has no registered grid to tune (give one: tune: {{name: [values]}})")
    return space


def candidates(space: dict[str, list]) -> list[dict[str, Any]]:
    names = sorted(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]
