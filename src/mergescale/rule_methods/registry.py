"""Merge methods that are workflow rules of their own (workflow/rules/methods/<rule>.smk).

A config entry ``merge.methods.<name>: {rule: <rule>, params: {...}}`` names such a rule.
Rules implemented in this package are registered here so the config is checked before
any job runs (their module declares HYPERPARAMETERS, or a check_params(params, where)
for params that are not flat scalars); a rule file added by a user (any script or
command) needs only its .smk file, and its params are passed through unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from pathlib import Path
from typing import Any

METHOD_RULES_DIR = Path(__file__).resolve().parents[3] / "workflow" / "rules" / "methods"
# rule name -> module declaring HYPERPARAMETERS (or check_params), DESCRIPTION, PAPER
KNOWN = {"opcm": "mergescale.rule_methods.opcm", "map": "mergescale.rule_methods.map_pareto", "lora_lego": "mergescale.rule_methods.lora_lego",
         "twin_merging": "mergescale.rule_methods.twin_merging"}


def rule_module(rule: str):
    return importlib.import_module(KNOWN[rule]) if rule in KNOWN else None


def resolve_params(rule: str, params: dict[str, Any] | None, where: str = "") -> dict[str, Any]:
    """Defaults filled in, values checked; errors name ``where``.<key>."""
    params = dict(params or {})
    module = rule_module(rule)
    if module is None:
        return params
    if hasattr(module, "check_params"):  # nested params: the module checks them itself
        return dataclasses.asdict(module.check_params(params, where.rstrip(".") or "params"))
    known = {h.name: h for h in module.HYPERPARAMETERS}
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=2, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{where}{key} is not a hyperparameter of rule {rule}{hint}; "
                             f"allowed: {', '.join(sorted(known))}")
    return {name: h.check(params[name], where=where.rstrip(".")) if name in params else h.default
            for name, h in known.items()}


def check_rule_exists(rule: str, rules_dir: Path = METHOD_RULES_DIR) -> None:
    if not (rules_dir / f"{rule}.smk").is_file():
        have = sorted(p.stem for p in rules_dir.glob("*.smk"))
        close = difflib.get_close_matches(rule, have, n=2, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"no rule file {rules_dir / (rule + '.smk')}{hint}; have: {', '.join(have) or 'none'}")
