"""mergekit's parameter settings: a number, a gradient over layers, or filtered values.

    t: 0.5                                  # one value for every tensor
    t: [0, 0.5, 0.3, 0.7, 1]                # a gradient: interpolated over the layers
    t:                                      # filters: the first whose text occurs in
      - filter: self_attn                   # the tensor name wins; no filter (or "*")
        value: [0, 0.5, 0.3, 0.7, 1]        # matches every tensor
      - value: 0.5

A gradient is read at t in [0, 1], the position of the layer inside its slice
(layer i of n: i / (n - 1); a one-layer slice: 1; tensors outside the layers: 0).
Numbers are interpolated linearly between the two nearest points; booleans and strings
take the point at or below t. These are mergekit's rules (mergekit.config.evaluate_setting).
"""

from __future__ import annotations

from typing import Any

from mergescale.merge.errors import MergeInputError

_SCALARS = (bool, int, float, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_setting(value: Any, key: str) -> Any:
    """Check the shape of a setting (scalar, gradient, filter list); return it with a
    single `{filter, value}` mapping turned into a one-element list."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise MergeInputError(f"{key}: expected a value, a list of values (a gradient) or "
                              f"a list of {{filter, value}} entries, got {value!r}")
    if all(isinstance(v, _SCALARS) for v in value):
        return value
    for i, cond in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(cond, dict) or "value" not in cond:
            raise MergeInputError(f"{where}: expected a mapping with 'value' (and optionally 'filter'), got {cond!r}")
        extra = set(cond) - {"value", "filter"}
        if extra:
            raise MergeInputError(f"{where}.{sorted(extra)[0]}: unknown key; allowed: filter, value")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise MergeInputError(f"{where}.filter: expected a string, got {cond['filter']!r}")
        inner = cond["value"]
        ok = isinstance(inner, _SCALARS) or (
            isinstance(inner, list) and inner and all(isinstance(v, _SCALARS) for v in inner))
        if not ok:
            raise MergeInputError(f"{where}.value: expected a value or a list of values, got {inner!r}")
    return value


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of a checked setting for one tensor at gradient position t (None:
    no filter matched, so a lower-precedence scope decides)."""
    if isinstance(setting, _SCALARS):
        return setting
    if all(isinstance(v, _SCALARS) for v in setting):
        if not all(_is_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def is_constant(setting: Any) -> bool:
    """A plain scalar: the same value for every tensor."""
    return isinstance(setting, _SCALARS)


def resolve(scopes: list[dict[str, Any]], tensor_name: str, t: float, keys=None) -> dict[str, Any]:
    """Per key, the first scope (highest precedence first) whose setting yields a value."""
    out: dict[str, Any] = {}
    names = keys if keys is not None else {k for s in scopes for k in s}
    for key in names:
        for scope in scopes:
            if key in scope:
                value = evaluate_setting(scope[key], tensor_name, t)
                if value is not None:
                    out[key] = value
                    break
    return out
