"""Deterministic train / validation / test splits that never share a prompt."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from mergescale.io_utils import atomic_write_text
from mergescale.tasks.families import get_family

SPLITS = ("train", "validation", "test")


def _task_seed(task: str, seed: int) -> int:
    # A stable per-task seed: adding a task to the config never changes another's data.
    digest = hashlib.sha256(f"{task}:{seed}".encode()).hexdigest()
    return int(digest[:16], 16)


def example_key(row: dict) -> str:
    """What makes an example unique: its prompt (generic text has none: its line)."""
    return row["prompt"] or row["answer"]


def make_splits(task: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Draw unique examples of ``task`` and deal them into disjoint splits.

    Evaluation splits are filled first so their content does not depend on the size of
    the training split.
    """
    family = get_family(task)
    rng = random.Random(_task_seed(task, seed))
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in ("test", "validation", "train"):
        want = sizes[split]
        rows: list[dict] = []
        attempts = 0
        while len(rows) < want:
            attempts += 1
            if attempts > 50 * want + 1000:
                raise ValueError(
                    f"task {task!r}: could only draw {len(rows)} unique examples for "
                    f"split {split!r} (asked for {want}); lower data sizes in the config"
                )
            ex = family.example(rng)
            key = example_key(ex)
            if key in seen:
                continue
            seen.add(key)
            rows.append(ex)
        out[split] = rows
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows
