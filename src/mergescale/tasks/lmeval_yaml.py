"""Render one lm-eval task YAML per (task, split), reading the local JSONL split.

The YAML is produced by a serializer (never string templates) so quoting cannot change
``"\\n"`` into something else (lm-eval's docs/footguns.md).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergescale.io_utils import atomic_write_text
from mergescale.tasks.families import get_family

TASK_YAML_VERSION = 1  # bump when prompts, answers or scoring change
MAX_ANSWER_CHARS = 12


def lm_eval_task_name(task: str, split: str) -> str:
    return f"mergescale_{task}_{split}"


def task_yaml(task: str, split: str, data_file: str | Path) -> dict:
    family = get_family(task)
    return {
        "task": lm_eval_task_name(task, split),
        "tag": [f"mergescale_{split}", f"mergescale_{family.cluster}"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        "test_split": split,
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {
            "until": ["\n"],
            "do_sample": False,
            "max_gen_toks": MAX_ANSWER_CHARS,
        },
        "filter_list": [
            {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
        ],
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
        ],
        "metadata": {"version": TASK_YAML_VERSION, "description": family.description},
    }


def write_task_yaml(task: str, split: str, data_file: str | Path, out: Path) -> None:
    text = yaml.safe_dump(task_yaml(task, split, data_file), sort_keys=False)
    atomic_write_text(out, text)
