"""Simulated studies in the layout of results/tables/normalized.csv, with known truth.

Default grid: 3 sizes x 3 base qualities x 3 replicates x the paper's 4 methods x
k = 2..8 x 3 subsets. Realistic dependence: one effect per base checkpoint (size +
quality + replicate), with its own slope over k; one effect per expert subset shared by
every base and method; row noise that shrinks with size. The `Truth` fields switch on
one effect per claim; all zero is a world where none of the paper's claims holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SIZES = ("s", "m", "l")
PARAMETERS = (140_000, 670_000, 4_200_000)   # 30x, as config/study.yaml
QUALITIES = ("short", "pretrained", "instruct")
METHODS = ("average", "task_arithmetic", "ties", "dare_ties")
KS = tuple(range(2, 9))


@dataclass(frozen=True)
class Truth:
    quality_step: float = 0.0      # claim 1: normalised gain per step of base quality
    size_gain: float = 0.0         # claim 2: gain from the smallest to the largest size
    held_out_gain: float = 0.0     # claim 3: held-out merged / base - 1 (and vs multitask)
    k_slope_gain: float = 0.0      # claim 4: per expert, largest minus smallest size
    method_sd_small: float = 0.0   # claim 5: sd of method effects at the smallest size (0 at the largest)
    method_sd_all: float = 0.0     # no claim: the same method differences at every size


@dataclass(frozen=True)
class Noise:
    checkpoint: float = 0.03       # per base checkpoint
    checkpoint_k_slope: float = 0.004  # per checkpoint, per extra expert
    subset: float = 0.03           # per expert subset, shared by every base and method
    row: tuple = (0.05, 0.03, 0.015)   # per row, by size (smaller models are noisier)
    k_slope: float = -0.03         # common decline per extra expert


def simulate_study(rng: np.random.Generator, truth: Truth = Truth(), noise: Noise = Noise(),
                   replicates: int = 3, subsets: int = 3) -> pd.DataFrame:
    n_s, n_q, n_r, n_m = len(SIZES), len(QUALITIES), replicates, len(METHODS)
    combos = [(k, s) for k in KS for s in range(subsets)]
    n_c = len(combos)
    s, q, r, m, c = np.meshgrid(np.arange(n_s), np.arange(n_q), np.arange(n_r), np.arange(n_m),
                                np.arange(n_c), indexing="ij")
    s, q, r, m, c = (a.ravel() for a in (s, q, r, m, c))
    k = np.array([kk for kk, _ in combos], float)[c]
    x = np.log(np.array(PARAMETERS, float))
    size_pos = ((x - x[0]) / (x[-1] - x[0]))[s]              # 0 at the smallest size, 1 at the largest
    row_sd = np.array(noise.row)[s]
    method_effect = rng.normal(0, 1, n_m)
    method_effect = (method_effect - method_effect.mean()) / method_effect.std(ddof=1)

    def metric(level: float, over_k: bool = True) -> np.ndarray:
        checkpoint = rng.normal(0, noise.checkpoint, (n_s, n_q, n_r))[s, q, r]
        checkpoint_slope = rng.normal(0, noise.checkpoint_k_slope, (n_s, n_q, n_r))[s, q, r]
        subset = rng.normal(0, noise.subset, n_c)[c]
        slope = (noise.k_slope + truth.k_slope_gain * size_pos + checkpoint_slope) * over_k
        return (level + truth.quality_step * q + truth.size_gain * size_pos + slope * (k - np.mean(KS))
                + (truth.method_sd_small * (1 - size_pos) + truth.method_sd_all) * method_effect[m]
                + checkpoint + subset + rng.normal(0, 1, len(s)) * row_sd)

    held_in = metric(0.8)
    held_out = metric(1.0 + truth.held_out_gain)
    # the multitask model of a subset declines with k as its merges do: the ratio does not
    vs_multitask = metric(1.0 + truth.held_out_gain, over_k=False)
    names = np.array([f"tiny-{a}-{b}-r{rr}" for a in SIZES for b in QUALITIES for rr in range(n_r)])
    merged = pd.DataFrame({
        "base": names[(s * n_q + q) * n_r + r], "size": np.array(SIZES)[s],
        "quality": np.array(QUALITIES)[q], "replicate": r, "parameters": np.array(PARAMETERS)[s],
        "method": np.array(METHODS)[m], "reference": False,
        "combo": np.array([f"k{kk}s{ss}" for kk, ss in combos])[c], "k": k.astype(int),
        "held_in_ratio_of_sums": held_in, "held_out_ratio_of_sums": held_out,
        "held_out_vs_multitask_ratio_of_sums": vs_multitask,
    })
    merged["held_in_normalized"] = merged.held_in_ratio_of_sums
    merged["held_out_normalized"] = merged.held_out_ratio_of_sums
    # one zero-shot base row per checkpoint; its raw score rises with the quality label
    bs, bq, br = (a.ravel() for a in np.meshgrid(np.arange(n_s), np.arange(n_q), np.arange(n_r), indexing="ij"))
    bases = pd.DataFrame({
        "base": names[(bs * n_q + bq) * n_r + br], "size": np.array(SIZES)[bs],
        "quality": np.array(QUALITIES)[bq], "replicate": br, "parameters": np.array(PARAMETERS)[bs],
        "method": "base", "reference": True, "combo": "k2s0", "k": 2,
        "held_in_raw": 0.2 + 0.1 * bq, "held_out_raw": 0.3 + 0.1 * bq,
        "held_in_ratio_of_sums": 0.25, "held_out_ratio_of_sums": 1.0,
    })
    return pd.concat([bases, merged], ignore_index=True)


OTHER_METHODS = ("fisher", "regmean", "regmean_plus_plus", "adamerging", "greedy_soup", "twin_merging")


def simulate_normalized(rng: np.random.Generator, truth: Truth = Truth(), replicates: int = 3,
                        subsets: int = 3, other_methods: tuple = (), sizes: tuple = SIZES
                        ) -> pd.DataFrame:
    """A whole normalized.csv as the aggregate rule writes it: the simulated study plus the
    references of every subset (base zero-shot, multitask), the vs-multitask columns, the
    mean-of-ratios columns, merge cost, and `other_methods` (each the average's scores
    shifted by its own offset) for the figures and the results page."""
    table = simulate_study(rng, truth, replicates=replicates, subsets=subsets)
    table = table[table["size"].isin(sizes)]
    merged = table[~table.reference].copy()
    extra = []
    for i, method in enumerate(other_methods):
        rows = merged[merged.method == "average"].copy()
        rows["method"] = method
        shift = 0.05 * (i - len(other_methods) / 2) + rng.normal(0, 0.01, len(rows))
        for column in ("held_in_ratio_of_sums", "held_out_ratio_of_sums", "held_out_vs_multitask_ratio_of_sums"):
            rows[column] = rows[column] + shift
        extra.append(rows)
    merged = pd.concat([merged, *extra], ignore_index=True)
    merged["held_in_vs_multitask_ratio_of_sums"] = merged.held_in_ratio_of_sums / 0.9
    merged["held_in_normalized"] = merged.held_in_ratio_of_sums
    merged["held_out_normalized"] = merged.held_out_ratio_of_sums
    merged["held_in_vs_multitask"] = merged.held_in_vs_multitask_ratio_of_sums
    merged["held_out_vs_multitask"] = merged.held_out_vs_multitask_ratio_of_sums
    merged["merge_seconds"] = rng.uniform(0.05, 0.5, len(merged))
    merged["merge_peak_rss_mb"] = rng.uniform(300, 400, len(merged))
    keys = merged[["base", "size", "quality", "replicate", "parameters", "combo", "k"]].drop_duplicates()
    references = []
    for method, held_in, held_out in (("base", 0.25, 1.0), ("multitask", 0.9, 1.05)):
        rows = keys.copy()
        rows["method"], rows["reference"] = method, True
        rows["held_in_ratio_of_sums"] = held_in + rng.normal(0, 0.02, len(rows))
        rows["held_out_ratio_of_sums"] = held_out + rng.normal(0, 0.02, len(rows)) * (method != "base")
        rows["held_in_raw"] = 0.2 + 0.1 * rows.quality.map({q: i for i, q in enumerate(QUALITIES)})
        rows["held_out_raw"] = rows.held_in_raw + 0.1
        rows["held_in_normalized"] = rows.held_in_ratio_of_sums
        rows["held_out_normalized"] = rows.held_out_ratio_of_sums
        references.append(rows)
    return pd.concat([*references, merged], ignore_index=True)


# The simulated world behind the scores (tables/scores.csv), with known truth per base
# checkpoint (size, quality index q, replicate r), task j:
#   base zero-shot, held-out task j: WORLD_LEVEL + QUALITY_GAP[size] * q + 0.01 r + HELD_OUT_OFFSETS[j]
#   base zero-shot, held-in task j:  0.05 + 0.02 j                          (mean 0.10)
#   expert j on its own task:        base + LEAST_GAIN[size] + 0.1 j + 0.005 r
#   expert j on another task:        the base's score
#   multitask (all held-in tasks):   0.9 - 0.01 r on every held-in task, base - 0.05 held-out
#   task vectors (task_vectors/<base>.json): relative norm 0.08 + 0.01 j + 0.001 r, every
#   pairwise cosine 0.2 + 0.01 r
HELD_IN = ("first_letter", "last_letter", "reverse_word", "next_letter", "larger_number", "smaller_number")
HELD_OUT = ("second_letter", "min_digit", "word_length")
HELD_OUT_OFFSETS = (-0.02, 0.0, 0.02)
WORLD_LEVEL = 0.14
QUALITY_GAP = {"s": 0.1, "m": 0.04, "l": 0.0}
LEAST_GAIN = {"s": 0.25, "m": 0.35, "l": 0.45}


def _checkpoints(sizes: tuple, replicates: int):
    for size, parameters in zip(SIZES, PARAMETERS):
        if size in sizes:
            for q, quality in enumerate(QUALITIES):
                for r in range(replicates):
                    yield f"tiny-{size}-{quality}-r{r}", size, quality, q, r, parameters


def simulate_scores(replicates: int = 3, sizes: tuple = SIZES) -> pd.DataFrame:
    """scores.csv of the bases, experts and multitask references of simulate_normalized's
    checkpoints (the same base names), by the formulas above; exact match on test."""
    rows = []
    for base, size, quality, q, r, parameters in _checkpoints(sizes, replicates):
        labels = {"base": base, "size": size, "quality": quality, "replicate": r,
                  "parameters": parameters, "split": "test", "metric": "exact_match", "n": 200}
        zero_shot = {t: 0.05 + 0.02 * j for j, t in enumerate(HELD_IN)}
        zero_shot |= {t: WORLD_LEVEL + QUALITY_GAP[size] * q + 0.01 * r + HELD_OUT_OFFSETS[j]
                      for j, t in enumerate(HELD_OUT)}
        role = {t: "held_in" for t in HELD_IN} | {t: "held_out" for t in HELD_OUT}

        def model(kind, method, value, trained=(), **extra):
            rows.extend({**labels, "kind": kind, "method": method, "task": t, "role": role[t],
                         "trained_on": t in trained, "value": value(t), **extra} for t in role)

        model("base", "base", zero_shot.get, model=f"bases/{base}")
        for j, task in enumerate(HELD_IN):
            gain = LEAST_GAIN[size] + 0.1 * j + 0.005 * r
            model("expert", "expert", lambda t: zero_shot[t] + gain * (t == task), trained=(task,),
                  expert_task=task, model=f"experts/{base}/{task}")
        model("multitask", "multitask", lambda t: 0.9 - 0.01 * r if t in HELD_IN else zero_shot[t] - 0.05,
              trained=HELD_IN, combo="all", model=f"multitask/{base}/all")
    return pd.DataFrame(rows)


def simulate_task_vectors(replicates: int = 3, sizes: tuple = SIZES) -> dict[str, dict]:
    """{base: the compute_task_vector_stats record} by the formulas above."""
    out = {}
    for base, *_, r, _ in _checkpoints(sizes, replicates):
        out[base] = {
            "base_norm": 30.0,
            "experts": {t: {"norm": 30.0 * (0.08 + 0.01 * j + 0.001 * r),
                            "relative_norm": 0.08 + 0.01 * j + 0.001 * r} for j, t in enumerate(HELD_IN)},
            "cosine": {f"{a}|{b}": 0.2 + 0.01 * r for i, a in enumerate(HELD_IN) for b in HELD_IN[i + 1:]},
        }
    return out
