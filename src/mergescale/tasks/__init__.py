"""Procedural tasks: generators, disjoint splits, and lm-eval task YAML."""

from mergescale.tasks.families import ALPHABET, FAMILIES, TaskFamily, get_family
from mergescale.tasks.lmeval_yaml import lm_eval_task_name, write_task_yaml
from mergescale.tasks.splits import SPLITS, make_splits, read_jsonl, write_jsonl

__all__ = [
    "ALPHABET", "FAMILIES", "SPLITS", "TaskFamily", "get_family", "lm_eval_task_name",
    "make_splits", "read_jsonl", "write_jsonl", "write_task_yaml",
]
