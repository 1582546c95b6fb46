"""Expert subsets ("combos"): which held-in experts a merge combines.

A combo is named ``k{k}s{s}``: ``k`` experts, subset number ``s``. Subsets are nested
across k, as in Yadav et al. (2024): subset ``s`` is the first k tasks of one seeded
ordering of the held-in tasks, so ``k4s1`` holds the experts of ``k2s1`` and two more,
and a change in k changes nothing but k. Orderings are drawn with a seed derived from
(seed, s) and rejected while one of their prefixes repeats an earlier subset's, so every
k below the number of held-in tasks has ``subsets_per_k`` distinct subsets when that many
exist; at k = n (all held-in tasks) there is one.
"""

from __future__ import annotations

import math
import random
import re

COMBO_PATTERN = re.compile(r"^k(\d+)s(\d+)$")
# Not a subset: the name of the multitask reference trained on every held-in task.
ALL_HELD_IN = "all"
MAX_ATTEMPTS = 1000  # orderings tried per subset before a repeated prefix is accepted


def combo_name(k: int, s: int) -> str:
    return f"k{k}s{s}"


def parse_combo(name: str) -> tuple[int, int]:
    m = COMBO_PATTERN.match(name)
    if not m:
        raise ValueError(f"combo name {name!r} is not of the form k<K>s<S>")
    return int(m.group(1)), int(m.group(2))


def nested_orderings(held_in: list[str], ks: list[int], subsets: int, seed: int) -> list[list[str]]:
    """``subsets`` orderings of the held-in tasks whose k-prefixes (k in ks) are distinct
    subsets wherever enough subsets of that size exist."""
    tasks = sorted(held_in)
    n = len(tasks)
    orderings: list[list[str]] = []
    seen = {k: set() for k in ks}
    for s in range(subsets):
        for attempt in range(MAX_ATTEMPTS):
            order = random.Random(f"{seed}:nested:{s}:{attempt}").sample(tasks, n)
            fresh = all(frozenset(order[:k]) not in seen[k] for k in ks
                        if len(seen[k]) < math.comb(n, k))
            if fresh:
                break
        orderings.append(order)
        for k in ks:
            seen[k].add(frozenset(order[:k]))
    return orderings


def expert_subsets(held_in: list[str], ks: list[int], subsets_per_k: int, seed: int) -> dict[str, list[str]]:
    """Return {combo name: sorted task list}; fewer subsets when k leaves fewer choices."""
    n = len(held_in)
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} experts asked for, but only {n} held-in tasks are configured")
    out: dict[str, list[str]] = {}
    for s, order in enumerate(nested_orderings(held_in, ks, subsets_per_k, seed)):
        for k in ks:
            subset = sorted(order[:k])
            if subset not in (out[combo_name(k, t)] for t in range(s) if combo_name(k, t) in out):
                out[combo_name(k, s)] = subset
    return dict(sorted(out.items(), key=lambda kv: parse_combo(kv[0])))
