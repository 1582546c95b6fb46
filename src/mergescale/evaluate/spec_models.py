"""Models that are not one static checkpoint, evaluated by lm-eval through registered classes.

A rule-method may write, instead of a Hugging Face checkpoint, a directory with
`model_spec.json`:

    {"model": "<name registered with lm-eval>", "model_args": {...}, "module": "<optional>"}

The evaluation step (mergescale.evaluate.harness) then imports `module` (where the class
registers itself with lm-eval) and builds `get_model(model)(spec_dir=<dir>, device=...,
batch_size=..., **model_args)`. This module names no method: each method's class lives
beside the method (rule_methods/twin_merging_lm.py, evaluate/ensemble_lm.py).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from lm_eval.api.registry import get_model

SPEC_NAME = "model_spec.json"


def write_spec(out_dir: Path, model: str, model_args: dict | None = None, module: str | None = None) -> None:
    spec = {"model": model, "model_args": model_args or {}}
    if module:
        spec["module"] = module
    (Path(out_dir) / SPEC_NAME).write_text(json.dumps(spec, indent=2) + "\n")


def load_spec_model(spec_dir: Path, device: str = "cpu", batch_size: int = 64):
    """The lm-eval model that `spec_dir/model_spec.json` names, built from that directory."""
    path = Path(spec_dir) / SPEC_NAME
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise ValueError(f"{path}: expected an object with a string key 'model'")
    unknown = set(spec) - {"model", "model_args", "module"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: model, model_args, module")
    args = spec.get("model_args", {})
    if not isinstance(args, dict):
        raise ValueError(f"{path}: 'model_args' must be an object, got {args!r}")
    if spec.get("module"):
        importlib.import_module(spec["module"])
    try:
        cls = get_model(spec["model"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: model {spec['model']!r} is not registered with lm-eval ({err})") from None
    return cls(spec_dir=str(spec_dir), device=device, batch_size=batch_size, **args)
