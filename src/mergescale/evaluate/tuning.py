"""Validation-split hyperparameter search for merge methods.

A tuned method's search space is its registered grid (``Hyperparameter.grid``), or a
grid the config gives; every candidate is merged and scored on the validation split of
the merged experts' tasks, all in one process: one lm-eval session and one model
(``BatchEvaluator``) score every candidate, each merged just before it is scored. The
candidate with the best mean validation exact match is chosen (ties: the first in the
grid's order, so the choice is deterministic). The search space, every candidate's
scores and the choice are written to one JSON file that the final merge reads.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

from mergescale.evaluate.harness import BatchEvaluator, Candidate
from mergescale.io_utils import atomic_write_json
from mergescale.merge import MergeRequest, get_method, run_merge, validate_params
from mergescale.merge.search_space import candidates


def tune_merge(*, method: str, base: Path, experts: list[Path], space: dict[str, list],
               fixed: dict, task_dir: Path, tasks: list[str], out: Path, dtype: str = "float32",
               seed: int = 0, batch_size: int = 64, limit: int | None = None,
               log=print) -> dict:
    """Merge and score every candidate on the validation split; write and return the record."""
    start = time.perf_counter()
    grid = candidates(space)
    method_obj = get_method(method)
    for candidate in grid:  # every candidate's params are checked before any merge runs
        validate_params(method_obj, {**fixed, **candidate})
    split_tasks = tuple((t, "validation") for t in tasks)

    def merged_candidates():
        # Each merge lives in its own temporary directory until the evaluator asks for the
        # next candidate, i.e. until it has been scored.
        for i, candidate in enumerate(grid):
            with tempfile.TemporaryDirectory(prefix="mergescale-tune-") as tmp:
                merged = Path(tmp) / "model"
                run_merge(MergeRequest(method=method, base=base, experts=experts, out_dir=merged,
                                       params={**fixed, **candidate}, dtype=dtype, seed=seed,
                                       progress=False))
                yield Candidate(name=f"candidate {i + 1}", weights=merged, tasks=split_tasks,
                                meta={"index": i, "params": candidate})

    merges = merged_candidates()
    first = next(merges)
    # The first merge is the batch's reference model: config and dtype those of a merged
    # checkpoint, so each candidate scores as evaluate() would score it once written.
    evaluator = BatchEvaluator(first.weights, task_dir, batch_size=batch_size, limit=limit,
                               seed=seed, log=lambda *_: None)
    results = []
    for cand, scored in evaluator.score(itertools.chain([first], merges)):
        per_task = {row["task"]: row["value"] for row in scored["scores"]}
        mean = sum(per_task.values()) / len(per_task)
        results.append({"params": cand.meta["params"], "validation": per_task, "mean": mean})
        log(f"[{cand.meta['index'] + 1}/{len(grid)}] {cand.meta['params']}: "
            f"mean validation exact match {mean:.3f}")
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


def tuning_table(records: dict[tuple[str, str, str], dict]) -> str:
    """Markdown of the chosen hyperparameters: one row per (base, method, k), the value
    chosen in each subset and how many candidates were scored ({(base, method, combo): record})."""
    from mergescale.tasks.combos import parse_combo

    rows: dict[tuple[str, str, int], list[str]] = {}
    budget: dict[tuple[str, str, int], int] = {}
    for (base, method, combo), record in sorted(records.items()):
        k = parse_combo(combo)[0]
        chosen = ", ".join(f"{name}={record['chosen'][name]}" for name in sorted(record["space"]))
        rows.setdefault((base, method, k), []).append(
            f"{combo}: {chosen} ({record['chosen_validation_mean']:.3f})")
        budget[(base, method, k)] = len(record["candidates"])
    lines = ["# Tuned hyperparameters", "",
             "Chosen on the validation split per expert subset (mean validation exact match of "
             "the subset's tasks in brackets); `candidates` is the number of merges scored.", "",
             "| base | method | k | candidates | chosen |", "|---|---|---|---|---|"]
    for (base, method, k), chosen in sorted(rows.items()):
        lines.append(f"| {base} | {method} | {k} | {budget[(base, method, k)]} | {'; '.join(chosen)} |")
    return "\n".join(lines) + "\n"
