"""Expert subsets ("combos"): which held-in experts a merge combines.

A combo is named ``k{k}s{s}``: ``k`` experts, subset number ``s``. Subsets are drawn
without replacement from the held-in tasks with a seed derived from (seed, k, s), so
adding a value of k never changes the subsets of another.
"""

from __future__ import annotations

import math
import random
import re

COMBO_PATTERN = re.compile(r"^k(\d+)s(\d+)$")


def combo_name(k: int, s: int) -> str:
    return f"k{k}s{s}"


def parse_combo(name: str) -> tuple[int, int]:
    m = COMBO_PATTERN.match(name)
    if not m:
        raise ValueError(f"combo name {name!r} is not of the form k<K>s<S>")
    return int(m.group(1)), int(m.group(2))


def expert_subsets(held_in: list[str], ks: list[int], subsets_per_k: int, seed: int) -> dict[str, list[str]]:
    """Return {combo name: sorted task list}; fewer subsets when k leaves fewer choices."""
    n = len(held_in)
    out: dict[str, list[str]] = {}
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} experts asked for, but only {n} held-in tasks are configured")
        wanted = min(subsets_per_k, math.comb(n, k))
        seen: set[tuple[str, ...]] = set()
        attempt = 0
        while len(seen) < wanted:
            rng = random.Random(f"{seed}:{k}:{attempt}")
            subset = tuple(sorted(rng.sample(sorted(held_in), k)))
            attempt += 1
            if subset in seen:
                continue
            seen.add(subset)
            out[combo_name(k, len(seen) - 1)] = list(subset)
    return out
