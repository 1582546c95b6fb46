"""Registry of merge methods and their hyperparameter schemas.

A method is registered once, with the decorator `register_method`, in the file that
implements it; `mergescale.merge` imports every file under `merge/methods/`, so the
registry is complete as soon as the package is imported. The workflow, the CLI
(`mergescale methods --json`) and the docs all read this one registry.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from mergescale.errors import did_you_mean
from mergescale.merge.errors import MergeInputError

_TYPES: dict[str, type] = {"float": float, "int": int, "bool": bool, "str": str, "mapping": dict}


class TensorMergeFn(Protocol):
    """The per-tensor contract every method implements.

    base: the base model's tensor (None when the method needs no base and none is given).
    experts: one tensor per expert, same shape as base; any float dtype (methods compute
        in float32 via `ops.f32`).
    expert_params: one dict of per-expert hyperparameters per expert, defaults filled.
    params: global hyperparameters, defaults filled.
    generator: seeded from (seed, tensor name) for randomised methods, else None.
    name: the tensor's name (e.g. "model.layers.3.mlp.up_proj.weight").
    stats (keyword, only for methods registered with `stats`): one dict per expert,
        kind -> that expert's statistic for this tensor, or None where it has none.
    Returns the merged tensor in float32, same shape as the inputs.
    """

    def __call__(
        self,
        base: torch.Tensor | None,
        experts: list[torch.Tensor],
        expert_params: list[dict[str, Any]],
        params: dict[str, Any],
        generator: torch.Generator | None,
        name: str,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: its type, default and admissible range.

    `low`/`high` bound numeric values (None = unbounded); `*_inclusive` says whether
    the bound itself is allowed. `per_expert` hyperparameters may differ per expert
    (mergekit's per-model `parameters:`); a value given globally applies to every expert.
    """

    name: str
    type: str  # one of "float", "int", "bool", "str", "mapping" (checked by its owner)
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    per_expert: bool = False
    choices: tuple[str, ...] | None = None
    # Values searched on the validation split when a config asks to tune the method
    # (None: not tuned, the default or configured value is used).
    grid: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise TypeError(f"hyperparameter {self.name!r}: unknown type {self.type!r}")
        # A schema whose own default is invalid is a programming error: fail at import.
        if self.default is not None:
            self.check(self.default, where="default")
        for value in self.grid or ():
            self.check(value, where="grid")

    def check(self, value: Any, where: str = "") -> Any:
        """Return `value` coerced to this type, or raise MergeInputError naming the key."""
        label = f"{where}{'.' if where else ''}{self.name}"
        if self.type == "mapping":  # its keys are checked by the method that reads it
            if not isinstance(value, dict):
                raise MergeInputError(f"{label}: expected a mapping, got {value!r}")
            return copy.deepcopy(value)
        if self.type == "bool":
            if not isinstance(value, bool):
                raise MergeInputError(f"{label}: expected true/false, got {value!r}")
            return value
        if self.type == "str":
            if not isinstance(value, str):
                raise MergeInputError(f"{label}: expected a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise MergeInputError(f"{label}: {value!r} is not one of {list(self.choices)}")
            return value
        # Numbers: bool is an int subclass in Python, refuse it explicitly.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeInputError(f"{label}: expected a number, got {value!r}")
        if self.type == "int":
            if isinstance(value, float) and not value.is_integer():
                raise MergeInputError(f"{label}: expected an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise MergeInputError(f"{label}: must be finite, got {value!r}")
        if self.low is not None:
            bad = value < self.low if self.low_inclusive else value <= self.low
            if bad:
                raise MergeInputError(f"{label}={value!r} is outside {self.range_text()}")
        if self.high is not None:
            bad = value > self.high if self.high_inclusive else value >= self.high
            if bad:
                raise MergeInputError(f"{label}={value!r} is outside {self.range_text()}")
        return value

    def range_text(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(self.choices) + "}"
        if self.type == "bool":
            return "true/false"
        if self.type == "mapping":
            return "mapping"
        if self.low is None and self.high is None:
            return "any"
        lo = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + ("]" if self.high_inclusive else ")")
        return f"{lo}, {hi}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "range": self.range_text(),
            "low": self.low,
            "high": self.high,
            "low_inclusive": self.low_inclusive,
            "high_inclusive": self.high_inclusive,
            "choices": list(self.choices) if self.choices else None,
            "per_expert": self.per_expert,
            "grid": list(self.grid) if self.grid else None,
            "description": self.description,
        }


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the per-tensor function plus what it needs."""

    name: str
    function: TensorMergeFn
    hyperparameters: tuple[Hyperparameter, ...]
    needs_base: bool
    randomised: bool
    paper: str
    description: str
    # Whether a given base is read at all (multislerp uses one if given; linear ignores it).
    uses_base: bool = True
    # Experts the method accepts (slerp: one expert plus the base).
    min_experts: int = 1
    max_experts: int | None = None
    # Called once per merge with (tensor names, reference config.json or None); returns
    # extra entries for `params`, e.g. the layer count that layer_swap needs.
    setup: Callable[[list[str], dict | None], dict[str, Any]] | None = None
    # Data-aware methods. `stats`: per-expert statistics the per-tensor function receives
    # as `stats=` ("fisher", "gram"; see mergescale.merge.statistics). `fit`: a pass over validation
    # data before streaming (mergescale.merge.data_aware); it returns learned values for
    # `params` and may provide the statistics itself. Statistics of a method without a
    # fit come from the workflow's compute_stats rule.
    stats: tuple[str, ...] = ()
    fit: Callable[..., Any] | None = None
    # Element-wise methods that merge a tensor block by block from inputs read by flat
    # ranges: called like `function`, with sources (ops.TensorSource or
    # safetensors_io.FileSource) for tensors, it yields (start, end, float32 block) in
    # flat order. The engine uses it for tensors too big to hold.
    blocks: Callable[..., Any] | None = None

    @property
    def needs_data(self) -> bool:
        return self.fit is not None

    @property
    def needs_stats_rule(self) -> bool:
        return bool(self.stats) and self.fit is None

    @property
    def source_file(self) -> str:
        """The file implementing the method (family settings wrap a shared function)."""
        fn = self.function
        while isinstance(fn, functools.partial):
            fn = fn.func
        return inspect.getsourcefile(fn)

    def hyperparameter(self, key: str) -> Hyperparameter | None:
        return next((h for h in self.hyperparameters if h.name == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "per-tensor",
            "description": self.description,
            "paper": self.paper,
            "needs_base": self.needs_base,
            "uses_base": self.uses_base,
            "randomised": self.randomised,
            "min_experts": self.min_experts,
            "max_experts": self.max_experts,
            "stats": list(self.stats),
            "needs_data": self.needs_data,
            "hyperparameters": [h.to_dict() for h in self.hyperparameters],
        }


_METHODS: dict[str, MergeMethod] = {}


def register_method(
    *,
    name: str,
    hyperparameters: list[Hyperparameter] | tuple[Hyperparameter, ...] = (),
    needs_base: bool,
    randomised: bool = False,
    paper: str,
    description: str,
    uses_base: bool | None = None,
    min_experts: int = 1,
    max_experts: int | None = None,
    setup: Callable[[list[str], dict | None], dict[str, Any]] | None = None,
    stats: tuple[str, ...] = (),
    fit: Callable[..., Any] | None = None,
    blocks: Callable[..., Any] | None = None,
) -> Callable[[TensorMergeFn], TensorMergeFn]:
    """Decorator: register `function` under `name`. A second registration of a name raises.

    uses_base defaults to needs_base.
    """

    names = [h.name for h in hyperparameters]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"method {name!r}: hyperparameter(s) declared twice: {sorted(duplicates)}")

    def decorate(function: TensorMergeFn) -> TensorMergeFn:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        _METHODS[name] = MergeMethod(
            name=name,
            function=function,
            hyperparameters=tuple(hyperparameters),
            needs_base=needs_base,
            randomised=randomised,
            paper=paper,
            description=description,
            uses_base=needs_base if uses_base is None else uses_base,
            min_experts=min_experts,
            max_experts=max_experts,
            setup=setup,
            stats=tuple(stats),
            blocks=blocks,
            fit=fit,
        )
        return function

    return decorate


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`; unknown names raise with close matches."""
    try:
        return _METHODS[name]
    except KeyError:
        raise MergeInputError(
            f"unknown merge method {name!r}{did_you_mean(name, _METHODS)}. "
            f"Known methods: {', '.join(sorted(_METHODS))}"
        ) from None


def list_methods() -> list[MergeMethod]:
    """Every registered method, sorted by name."""
    return [_METHODS[n] for n in sorted(_METHODS)]


@dataclass(frozen=True)
class ResolvedParams:
    """Hyperparameters after validation: globals and one dict per expert, defaults filled."""

    params: dict[str, Any]
    expert_params: list[dict[str, Any]]


def unknown_hyperparameter(hyperparameters, key: str, owner: str, where: str = "") -> MergeInputError:
    known = [h.name for h in hyperparameters]
    return MergeInputError(
        f"{where}{key} is not a hyperparameter of {owner}{did_you_mean(key, known, n=2)}; "
        f"allowed: {', '.join(sorted(known)) or 'none'}"
    )


def check_hyperparameters(
    hyperparameters: tuple[Hyperparameter, ...], params: dict[str, Any] | None, owner: str, where: str = ""
) -> dict[str, Any]:
    """The one hyperparameter checker (per-tensor methods and rule-methods alike): every
    key of `params` declared, values checked and coerced, defaults filled in for the
    global (not per-expert) ones; errors name `where` and the key, and say what `owner` takes.
    Per-expert values given here are checked (they apply to every expert) but not returned."""
    params = dict(params or {})
    for key in params:
        if not any(h.name == key for h in hyperparameters):
            raise unknown_hyperparameter(hyperparameters, key, owner, where)
    resolved: dict[str, Any] = {}
    for h in hyperparameters:
        if h.per_expert:
            if h.name in params:  # a value for every expert: check it even with no experts
                h.check(params[h.name], where=where.rstrip("."))
            continue
        value = params.get(h.name, h.default)
        if value is None:
            raise MergeInputError(f"{where}{owner}: hyperparameter {h.name!r} is required")
        resolved[h.name] = h.check(value, where=where.rstrip("."))
    return resolved


def validate_params(
    method: MergeMethod | str,
    params: dict[str, Any] | None,
    expert_params: list[dict[str, Any]] | None = None,
    n_experts: int | None = None,
) -> ResolvedParams:
    """Check hyperparameters against `method`'s schema and fill defaults.

    `params` holds global hyperparameters and, for per-expert ones, a value that applies
    to every expert; `expert_params[i]` overrides per-expert values for expert i.
    Unknown keys, wrong types and out-of-range values raise MergeInputError naming the
    key (and the expert index).
    """
    if isinstance(method, str):
        method = get_method(method)
    params = dict(params or {})
    if expert_params is None:
        expert_params = [{} for _ in range(n_experts or 0)]
    if n_experts is not None and len(expert_params) != n_experts:
        raise MergeInputError(
            f"{len(expert_params)} per-expert parameter sets given for {n_experts} experts"
        )
    resolved_global = check_hyperparameters(method.hyperparameters, params, method.name)

    resolved_experts: list[dict[str, Any]] = []
    for i, given in enumerate(expert_params):
        where = f"experts[{i}]."
        entry: dict[str, Any] = {}
        for key in given:
            h = method.hyperparameter(key)
            if h is None:
                raise unknown_hyperparameter(method.hyperparameters, key, method.name, where)
            if not h.per_expert:
                raise MergeInputError(
                    f"{where}{key}: {key!r} is a global hyperparameter of {method.name}; "
                    "set it once under the method's parameters"
                )
        for h in method.hyperparameters:
            if not h.per_expert:
                continue
            value = given.get(h.name, params.get(h.name, h.default))
            if value is None:
                raise MergeInputError(
                    f"{where}{h.name}: {method.name} needs {h.name!r} for every expert"
                )
            entry[h.name] = h.check(value, where=where.rstrip("."))
        resolved_experts.append(entry)
    return ResolvedParams(params=resolved_global, expert_params=resolved_experts)
