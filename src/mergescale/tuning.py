"""Validation-split hyperparameter search for merge methods.

A tuned method's search space is its registered grid (``Hyperparameter.grid``), or a
grid the config gives; every candidate is merged and scored on the validation split of
the merged experts' tasks, all in one process (lm-eval is imported once), and the
candidate with the best mean validation exact match is chosen (ties: the first in the
grid's order, so the choice is deterministic). The search space, every candidate's
scores and the choice are written to one JSON file that the final merge reads.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

from mergescale.evaluate import EvalRequest, evaluate
from mergescale.io_utils import atomic_write_json
from mergescale.merge import MergeRequest, get_method, run_merge, validate_params
from mergescale.merge.errors import MergeInputError


def search_space(method_name: str, tune: bool | dict, fixed: dict | None = None) -> dict[str, list]:
    """{hyperparameter: values}: the config's grid if given, else the registered grids of
    the hyperparameters the config does not fix."""
    method = get_method(method_name)
    fixed = fixed or {}
    if isinstance(tune, dict):
        space = {}
        for name, values in tune.items():
            hp = method.hyperparameter(name)
            if hp is None:
                raise MergeInputError(f"tune.{name}: {method_name} has no hyperparameter {name!r}")
            space[name] = [hp.check(v, where="tune") for v in values]
        return space
    space = {hp.name: list(hp.grid) for hp in method.hyperparameters
             if hp.grid and hp.name not in fixed}
    if not space:
        raise MergeInputError(
            f"{method_name} has no registered grid to tune (give one: tune: {{name: [values]}})")
    return space


def candidates(space: dict[str, list]) -> list[dict[str, Any]]:
    names = sorted(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]


def tune_merge(*, method: str, base: Path, experts: list[Path], space: dict[str, list],
               fixed: dict, task_dir: Path, tasks: list[str], out: Path, dtype: str = "float32",
               seed: int = 0, batch_size: int = 64, limit: int | None = None,
               log=print) -> dict:
    """Merge and score every candidate on the validation split; write and return the record."""
    start = time.perf_counter()
    grid = candidates(space)
    results = []
    for i, candidate in enumerate(grid):
        params = {**fixed, **candidate}
        validate_params(get_method(method), params)
        with tempfile.TemporaryDirectory(prefix="mergescale-tune-") as tmp:
            merged = Path(tmp) / "model"
            run_merge(MergeRequest(method=method, base=base, experts=experts, out_dir=merged,
                                   params=params, dtype=dtype, seed=seed, progress=False))
            scored = evaluate(EvalRequest(model_dir=merged, task_dir=task_dir,
                                          tasks=tuple((t, "validation") for t in tasks),
                                          batch_size=batch_size, limit=limit, seed=seed),
                              log=lambda *_: None)
        per_task = {row["task"]: row["value"] for row in scored["scores"]}
        mean = sum(per_task.values()) / len(per_task)
        results.append({"params": candidate, "validation": per_task, "mean": mean})
        log(f"[{i + 1}/{len(grid)}] {candidate}: mean validation exact match {mean:.3f}")
    best = max(range(len(results)), key=lambda i: (results[i]["mean"], -i))
    record = {
        "method": method, "space": space, "fixed": fixed, "split": "validation", "tasks": tasks,
        "objective": "mean exact match over the merged experts' tasks",
        "candidates": results, "chosen": {**fixed, **results[best]["params"]},
        "chosen_validation_mean": results[best]["mean"],
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    atomic_write_json(out, record)
    log(f"chose {record['chosen']} (validation {results[best]['mean']:.3f})")
    return record
