"""Training data for experts of public lm-eval tasks: an lm-eval task's training split,
rendered with the task's own prompt and target, as the prompt/answer JSONL that the
fine-tuning stages read (``tasks.lm_eval.<name>.train`` names the lm-eval task).

Rendering through lm-eval keeps training prompts identical to evaluation prompts.
Multiple-choice targets become the text of the correct choice.
"""

from __future__ import annotations

from pathlib import Path

from mergescale.tasks import write_jsonl


def training_rows(lm_task: str, include_path: Path | None = None) -> list[dict]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_path is None)
    if lm_task not in manager.all_tasks:
        raise KeyError(f"lm-eval has no task {lm_task!r} (tasks.lm_eval.*.train)")
    tasks = manager.load([lm_task])["tasks"]
    if lm_task not in tasks:
        raise ValueError(f"lm-eval {lm_task!r} is a group; name one of its tasks: {', '.join(sorted(tasks))}")
    task = tasks[lm_task]
    if not task.has_training_docs():
        raise ValueError(f"lm-eval task {lm_task!r} has no training split to fine-tune on")
    delimiter = task.config.target_delimiter
    rows = []
    for i, doc in enumerate(task.training_docs()):
        prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            target = choices[target] if isinstance(target, int) else target
        if isinstance(target, list):  # several valid answers: train on the first
            target = target[0]
        if not isinstance(prompt, str):
            raise ValueError(f"lm-eval task {lm_task!r}, training doc {i}: the prompt is not "
                             "text (tasks whose prompt is a choice index are not supported)")
        rows.append({"prompt": prompt + delimiter, "answer": str(target)})
    return rows


def export_training_split(lm_task: str, out: Path, include_path: Path | None = None,
                          log=print) -> int:
    rows = training_rows(lm_task, include_path)
    write_jsonl(rows, out)
    log(f"{lm_task}: {len(rows)} training examples -> {out}")
    return len(rows)
