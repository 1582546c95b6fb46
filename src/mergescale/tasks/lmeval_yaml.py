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


def task_yaml(task: str, split: str, data_file: str | Path, *, description: str | None = None,
              cluster: str | None = None, max_answer_chars: int = MAX_ANSWER_CHARS,
              until: tuple[str, ...] = ("\n",)) -> dict:
    """A procedural family's split, or (description and cluster given) prompt/answer rows
    of another source, e.g. a public lm-eval task's validation rows."""
    if description is None:
        family = get_family(task)
        description, cluster = family.description, family.cluster
    return {
        "task": lm_eval_task_name(task, split),
        "tag": [f"mergescale_{split}", f"mergescale_{cluster}"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        "test_split": split,
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {
            "until": list(until),
            "do_sample": False,
            "max_gen_toks": max_answer_chars,
        },
        "filter_list": [
            {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
        ],
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
        ],
        "metadata": {"version": TASK_YAML_VERSION, "description": description},
    }


def write_task_yaml(task: str, split: str, data_file: str | Path, out: Path) -> None:
    text = yaml.safe_dump(task_yaml(task, split, data_file), sort_keys=False)
    atomic_write_text(out, text)


MAX_ROWS_ANSWER_CHARS = 1024  # generation budget of rows with long answers (reasoning, code)


def write_rows_task_yaml(task: str, split: str, data_file: str | Path, out: Path,
                         description: str, cluster: str) -> None:
    """A task YAML over prompt/answer rows of any source: exact match of the greedy
    answer, with a generation budget sized to the longest answer (characters bound
    tokens), stopping at a newline, or at two blank lines where some answer spans lines."""
    from mergescale.tasks.splits import read_jsonl

    answers = [row["answer"] for row in read_jsonl(Path(data_file))]
    longest = max((len(a) for a in answers), default=MAX_ANSWER_CHARS)
    until = ("\n\n\n",) if any("\n" in a.strip() for a in answers) else ("\n",)
    spec = task_yaml(task, split, data_file, description=description, cluster=cluster,
                     max_answer_chars=min(max(longest + 2, MAX_ANSWER_CHARS), MAX_ROWS_ANSWER_CHARS),
                     until=until)
    atomic_write_text(out, yaml.safe_dump(spec, sort_keys=False))
