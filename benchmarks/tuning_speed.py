"""Validation-split tuning: one lm-eval session for the whole grid (mergescale.evaluate.tuning)
vs one evaluate() per candidate (how tuning worked before, kept here as the peer).

    python benchmarks/tuning_speed.py [--method ties] [--experts 2] [--examples 100]

Builds (once, cached under benchmarks/.cache/tuning/) a base of the study's size m
(hidden 128, 4 layers) and one expert per task, briefly trained, and the validation
split's lm-eval tasks. Then tunes METHOD over its registered grid both ways, in this
process, and prints the wall time of each and whether every candidate got the same
validation scores (they must: same merges, same lm-eval evaluation, same seeds).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from mergescale.evaluate.harness import EvalRequest, evaluate
from mergescale.merge import MergeRequest, run_merge
from mergescale.training.stages import finetune, pretrain_base
from mergescale.tasks import make_splits, write_jsonl
from mergescale.tasks.lmeval_yaml import write_task_yaml
from mergescale.evaluate.tuning import tune_merge
from mergescale.merge.search_space import candidates, search_space

CACHE = Path(__file__).resolve().parent / ".cache" / "tuning"
SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}
TASKS = ("first_letter", "last_letter", "reverse_word", "larger_number")


def build(n_experts: int, examples: int) -> tuple[Path, list[Path], list[str]]:
    """Base, experts and validation task YAMLs, built once per (experts, examples)."""
    root = CACHE / f"e{n_experts}-v{examples}"
    tasks = list(TASKS[:n_experts])
    experts = [root / "experts" / t for t in tasks]
    if all(e.exists() for e in experts):
        return root, experts, tasks
    quiet = dict(log=lambda m: None)
    data = {}
    for task in tasks:
        splits = make_splits(task, {"train": 1000, "validation": examples, "test": 10})
        for split, rows in splits.items():
            write_jsonl(rows, root / "data" / task / f"{split}.jsonl")
        write_task_yaml(task, "validation", root / "data" / task / "validation.jsonl",
                        root / "tasks" / f"{task}_validation.yaml")
        data[task] = root / "data" / task / "train.jsonl"
    print(f"building a base and {n_experts} experts in {root} (once)", flush=True)
    pretrain_base(SHAPE, {"steps": 150, "batch_size": 64, "lr": 3e-3}, data, root / "base", **quiet)
    for task, out in zip(tasks, experts):
        finetune(root / "base", {"steps": 100, "batch_size": 64, "lr": 2e-3}, {task: data[task]}, out,
                 stage="finetune_expert", **quiet)
    return root, experts, tasks


def one_evaluation_per_candidate(method, base, experts, space, task_dir, tasks) -> list[dict]:
    """The peer: merge each candidate to disk and score it with its own evaluate() call."""
    out = []
    for params in candidates(space):
        with tempfile.TemporaryDirectory() as tmp:
            run_merge(MergeRequest(method=method, base=base, experts=experts, out_dir=Path(tmp) / "m",
                                   params=params, progress=False))
            scored = evaluate(EvalRequest(model_dir=Path(tmp) / "m", task_dir=task_dir,
                                          tasks=tuple((t, "validation") for t in tasks)), log=lambda *_: None)
        out.append({row["task"]: row["value"] for row in scored["scores"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ties")
    p.add_argument("--experts", type=int, default=2, choices=range(1, len(TASKS) + 1))
    p.add_argument("--examples", type=int, default=100, help="validation examples per task")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root, experts, tasks = build(args.experts, args.examples)
    space = search_space(args.method, True)
    n = len(candidates(space))
    print(f"{args.method}: {n} candidates {space}, {args.experts} experts, "
          f"{args.examples} validation examples per task, {args.threads} thread(s)")

    t0 = time.perf_counter()
    peer = one_evaluation_per_candidate(args.method, root / "base", experts, space, root / "tasks", tasks)
    peer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    record = tune_merge(method=args.method, base=root / "base", experts=experts, space=space, fixed={},
                        task_dir=root / "tasks", tasks=tasks, out=root / "tuning.json", log=lambda *_: None)
    ours_s = time.perf_counter() - t0

    same = [c["validation"] for c in record["candidates"]] == peer
    print(f"one evaluate() per candidate: {peer_s:7.1f} s  ({peer_s / n:.2f} s per candidate)")
    print(f"one lm-eval session (tuning): {ours_s:7.1f} s  ({ours_s / n:.2f} s per candidate)")
    print(f"speed-up {peer_s / ours_s:.2f}x; validation scores identical for all {n} candidates: {same}")
    print(f"chosen {record['chosen']} (validation {record['chosen_validation_mean']:.3f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
