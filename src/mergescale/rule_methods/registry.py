"""Registry of rule-methods: merge methods that are a workflow job of their own.

A per-tensor method (merge/registry.py) is a function of one tensor at a time that the
streaming engine calls; a rule-method sees whole models (it learns a router, takes the
experts one by one, searches a front, learns coefficients...). It is registered once,
with the decorator `register_rule_method` on its entry point `run(job)`, in the module
that implements it; every module in `rule_methods/` is imported on first use (those
ending in ``_lm``, lm-eval model classes that evaluation loads by name, excepted), so
the registry is complete without a list kept by hand.

A config entry ``merge.methods.<name>: {rule: <registered name>, params: {...}}`` runs it:
its params are checked against the entry's `Hyperparameter`s (the same checker as the
per-tensor methods') when the config loads, and the workflow's generic rule
`merge_rule_method` (workflow/rules/merge.smk) gives `run` the inputs the entry says it
`needs`. A method with outputs of its own besides the merged model (`own_rule=True`)
declares its merge rule in workflow/rules/methods/<name>.smk, with the same script.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mergescale.errors import did_you_mean
from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import Hyperparameter, check_hyperparameters

# What a rule-method may need besides the base and the experts: one input file per task
# of the subset (None: found inside the expert directories).
NEEDS = {
    "validation_data": "results/data/{task}/validation.jsonl",  # labelled validation examples
    "validation_tasks": "results/tasks/{task}_validation.yaml",  # lm-eval tasks, validation split
    "test_tasks": "results/tasks/{task}_test.yaml",  # lm-eval tasks, test split
    "train_data": "results/data/{task}/train.jsonl",
    "lora_adapters": None,  # results/experts/{base}/{task}/adapter/
}
OUTPUTS = ("checkpoint", "model_spec")


@dataclass
class RuleJob:
    """What a rule-method's `run` gets: one merge of `experts` (over `base`) into `out_dir`.

    tasks: the expert subset's tasks, in the experts' order. params: the config entry's
    params, checked, defaults filled in. data / task_files: {need: one path per task}
    for the entry's `needs`. outputs: the method's own outputs besides `out_dir`
    (own_rule methods). evaluate: batch_size and limit, for methods that score models.
    labels: setting (the config name), base and combo, for rows the method writes.
    """

    method: str
    base: Path
    experts: list[Path]
    tasks: list[str]
    out_dir: Path
    params: dict[str, Any]
    seed: int
    dtype: str
    data: dict[str, list[Path]] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class RuleMethod:
    """A registered rule-method: its entry point plus what it needs and writes."""

    name: str
    run: Callable[[RuleJob], Any]
    hyperparameters: tuple[Hyperparameter, ...]
    paper: str
    description: str
    needs: tuple[str, ...] = ()
    output: str = "checkpoint"  # or "model_spec": a directory lm-eval loads by model_spec.json
    # Its merge rule is in workflow/rules/methods/<name>.smk (outputs of its own), not the
    # generic merge_rule_method.
    own_rule: bool = False
    # Its checkpoints are scored with the engine merges of their subset (one evaluate_batch job).
    batch_eval: bool = False
    # check(params, where): what the flat schema cannot say (nested params); raises
    # MergeInputError naming the key. check_config(config, name): config-wide conditions
    # (the bases it runs on); raises ConfigError naming the key.
    check: Callable[[dict[str, Any], str], None] | None = None
    check_config: Callable[[dict, str], None] | None = None

    @property
    def source_file(self) -> str:
        fn = self.run
        while isinstance(fn, functools.partial):
            fn = fn.func
        return inspect.getsourcefile(fn)

    def resolve(self, params: dict[str, Any] | None, where: str = "") -> dict[str, Any]:
        """Params checked and defaults filled in; errors name ``where``<key>."""
        resolved = check_hyperparameters(self.hyperparameters, params, f"rule-method {self.name}", where)
        if self.check is not None:
            self.check(resolved, where.rstrip(".") or "params")
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "rule",
            "description": self.description,
            "paper": self.paper,
            "needs": list(self.needs),
            "output": self.output,
            "own_rule": self.own_rule,
            "hyperparameters": [h.to_dict() for h in self.hyperparameters],
        }


_RULE_METHODS: dict[str, RuleMethod] = {}


def register_rule_method(
    *,
    name: str,
    hyperparameters: list[Hyperparameter] | tuple[Hyperparameter, ...] = (),
    paper: str,
    description: str,
    needs: tuple[str, ...] = (),
    output: str = "checkpoint",
    own_rule: bool = False,
    batch_eval: bool = False,
    check: Callable[[dict[str, Any], str], None] | None = None,
    check_config: Callable[[dict, str], None] | None = None,
) -> Callable[[Callable[[RuleJob], Any]], Callable[[RuleJob], Any]]:
    """Decorator on a rule-method's `run(job: RuleJob)`: register it under `name`."""
    names = [h.name for h in hyperparameters]
    if len(set(names)) < len(names):
        raise ValueError(f"rule-method {name!r}: a hyperparameter is declared twice: {names}")
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"rule-method {name!r}: unknown needs {unknown}; known: {list(NEEDS)}")
    if output not in OUTPUTS:
        raise ValueError(f"rule-method {name!r}: output {output!r} is not one of {OUTPUTS}")

    def decorate(run: Callable[[RuleJob], Any]) -> Callable[[RuleJob], Any]:
        if name in _RULE_METHODS:
            raise ValueError(f"rule-method {name!r} is already registered")
        _RULE_METHODS[name] = RuleMethod(
            name=name, run=run, hyperparameters=tuple(hyperparameters), paper=paper,
            description=description, needs=tuple(needs), output=output, own_rule=own_rule,
            batch_eval=batch_eval, check=check, check_config=check_config)
        return run

    return decorate


@functools.cache
def _discover() -> None:
    """Import every module of rule_methods/ once; their decorators fill the registry."""
    package = importlib.import_module("mergescale.rule_methods")
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if module != "registry" and not module.endswith("_lm"):
            importlib.import_module(f"mergescale.rule_methods.{module}")


def get_rule_method(name: str) -> RuleMethod:
    """The rule-method registered as `name`; unknown names raise with close matches."""
    _discover()
    try:
        return _RULE_METHODS[name]
    except KeyError:
        raise MergeInputError(
            f"no rule-method {name!r}{did_you_mean(name, _RULE_METHODS)}; registered: "
            f"{', '.join(sorted(_RULE_METHODS))}"
        ) from None


def list_rule_methods() -> list[RuleMethod]:
    """Every registered rule-method, sorted by name."""
    _discover()
    return [_RULE_METHODS[n] for n in sorted(_RULE_METHODS)]


def resolve_params(rule: str, params: dict[str, Any] | None, where: str = "") -> dict[str, Any]:
    """The params of a config entry ``{rule: <rule>, params: ...}``, checked, defaults filled."""
    return get_rule_method(rule).resolve(params, where)
