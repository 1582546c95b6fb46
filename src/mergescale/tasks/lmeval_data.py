"""Training and validation data for public lm-eval tasks: an lm-eval task's documents,
rendered with the task's own prompt and target, as the prompt/answer JSONL that the
fine-tuning stages, the statistics passes and the data-aware fits read
(``tasks.lm_eval.<name>.train`` and ``.validation`` name the lm-eval tasks).

Rendering through lm-eval keeps these prompts identical to evaluation prompts.
Multiple-choice targets become the text of the correct choice.

The validation split of a task is its own validation split where lm-eval does not score
on it (the task has a test split), else a held-back slice of its training split: a fixed
random HOLDOUT_FRACTION of the training documents (at most HOLDOUT_MAX, at least one),
chosen by HOLDOUT_SEED and the document count alone. The training rows exported for
experts then leave that slice out, so validation never overlaps what experts train on
nor what the evaluation scores.
"""

from __future__ import annotations

import random
from pathlib import Path

from mergescale.tasks import write_jsonl

HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 1000
HOLDOUT_SEED = 20240101


def load_task(lm_task: str, include_path: Path | None = None, key: str = "tasks.lm_eval.*.train"):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_path is None)
    if lm_task not in manager.all_tasks:
        raise KeyError(f"lm-eval has no task {lm_task!r} ({key})")
    tasks = manager.load([lm_task])["tasks"]
    if lm_task not in tasks:
        raise ValueError(f"lm-eval {lm_task!r} is a group; name one of its tasks: {', '.join(sorted(tasks))}")
    return tasks[lm_task]


def validation_source(task) -> str:
    """'validation' (the task's own split, not the one lm-eval scores) or 'train' (a
    held-back slice of the training split)."""
    cfg = task.config
    scored = cfg.test_split or cfg.validation_split
    if task.has_validation_docs() and cfg.validation_split != scored:
        return "validation"
    if task.has_training_docs():
        return "train"
    raise ValueError(f"lm-eval task {cfg.task!r} has no split to validate on: its validation "
                     "split is the one it is scored on and it has no training split")


def holdout_indices(n: int) -> set[int]:
    """The training documents held back for validation (a function of n alone)."""
    size = min(HOLDOUT_MAX, max(1, int(n * HOLDOUT_FRACTION)))
    order = list(range(n))
    random.Random(HOLDOUT_SEED).shuffle(order)
    return set(order[:size])


def _render(task, docs, lm_task: str, split: str) -> list[dict]:
    delimiter = task.config.target_delimiter
    rows = []
    for i, doc in docs:
        prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            target = choices[target] if isinstance(target, int) else target
        if isinstance(target, list):  # several valid answers: keep the first
            target = target[0]
        if not isinstance(prompt, str):
            raise ValueError(f"lm-eval task {lm_task!r}, {split} doc {i}: the prompt is not "
                             "text (tasks whose prompt is a choice index are not supported)")
        rows.append({"prompt": prompt + delimiter, "answer": str(target)})
    return rows


def split_rows(lm_task: str, split: str, include_path: Path | None = None) -> list[dict]:
    """Rows of `split` ("train" or "validation") of an lm-eval task, as described above."""
    key = f"tasks.lm_eval.*.{split}"
    task = load_task(lm_task, include_path, key)
    if split == "train":
        if not task.has_training_docs():
            raise ValueError(f"lm-eval task {lm_task!r} has no training split to fine-tune on")
        docs = list(task.training_docs())
        held = holdout_indices(len(docs)) if validation_source(task) == "train" else set()
        return _render(task, ((i, d) for i, d in enumerate(docs) if i not in held), lm_task, split)
    if split != "validation":
        raise ValueError(f"split {split!r}: only train and validation are exported")
    if validation_source(task) == "validation":
        return _render(task, enumerate(task.validation_docs()), lm_task, split)
    docs = list(task.training_docs())
    held = holdout_indices(len(docs))
    return _render(task, ((i, d) for i, d in enumerate(docs) if i in held), lm_task, split)


def export_split(lm_tasks: str | list[str], split: str, out: Path,
                 include_path: Path | None = None, log=print) -> int:
    """Write the rows of one or several lm-eval tasks (interleaved, so that a prefix of
    the file samples every task) to `out`."""
    names = [lm_tasks] if isinstance(lm_tasks, str) else list(lm_tasks)
    per_task = [split_rows(name, split, include_path) for name in names]
    rows = [r for group in _interleave(per_task) for r in group]
    write_jsonl(rows, out)
    log(f"{'+'.join(names)}: {len(rows)} {split} examples -> {out}")
    return len(rows)


def _interleave(lists: list[list[dict]]):
    for i in range(max((len(rows) for rows in lists), default=0)):
        yield [rows[i] for rows in lists if i < len(rows)]


def export_training_split(lm_task: str, out: Path, include_path: Path | None = None,
                          log=print) -> int:
    return export_split(lm_task, "train", out, include_path, log)
