"""The claim-level statistics on simulated studies where the truth is known.

Null worlds (tests/simulate_study.py: checkpoint effects, subset effects shared by every
base and method, identical methods, noise that shrinks with size; none of the paper's
claims holds) must give a false verdict ('supported' or 'refuted') in at most 10% of
worlds per claim; worlds with one clear true effect per claim must give 'supported' in at
least 80%. The measured rates are printed (pytest -s) and quoted in docs/findings.md.
"""

import numpy as np
import pytest

from mergescale.report.findings import analyse
from mergescale.report.inference import REFUTED, SUPPORTED
from simulate_study import Truth, simulate_study

WORLDS = 200
# Fewer draws than the workflow's 2000: the bootstrap only supplies a standard error here,
# which 300 draws estimate to within about 4%.
DRAWS = 300
CLEAR = Truth(quality_step=0.1, size_gain=0.1, held_out_gain=0.1, k_slope_gain=0.02,
              method_sd_small=0.08)


def verdict_rates(truth: Truth, worlds: int = WORLDS, seed: int = 0) -> dict[int, dict[str, float]]:
    """{claim: {verdict: share of worlds}} over `worlds` simulated studies."""
    counts: dict[int, dict[str, int]] = {}
    rng = np.random.default_rng(seed)
    for world in range(worlds):
        _, results = analyse(simulate_study(rng, truth), n_bootstrap=DRAWS, seed=world)
        for r in results:
            counts.setdefault(r.number, {}).setdefault(r.verdict, 0)
            counts[r.number][r.verdict] += 1
    return {claim: {v: n / worlds for v, n in by.items()} for claim, by in counts.items()}


# Two kinds of null world: identical methods; and methods that differ, by the same amount
# at every size (claim 5's trend is still null; the noise shrinking with size must not
# make them look closer at scale).
NULLS = {"identical methods": Truth(), "constant method differences": Truth(method_sd_all=0.05)}


@pytest.fixture(scope="module", params=list(NULLS))
def null_rates(request):
    rates = verdict_rates(NULLS[request.param], seed=1)
    print(f"\nnull worlds ({request.param}):", rates)
    return rates


@pytest.fixture(scope="module")
def clear_rates():
    rates = verdict_rates(CLEAR, seed=2)
    print("\nclear-effect worlds:", rates)
    return rates


@pytest.mark.parametrize("claim", [1, 2, 3, 4, 5])
def test_false_verdicts_in_null_worlds_at_most_10_percent(null_rates, claim):
    false = null_rates[claim].get(SUPPORTED, 0) + null_rates[claim].get(REFUTED, 0)
    assert false <= 0.10, null_rates[claim]


@pytest.mark.parametrize("claim", [1, 2, 3, 4, 5])
def test_clear_effects_found_in_80_percent_of_worlds(clear_rates, claim):
    assert clear_rates[claim].get(SUPPORTED, 0) >= 0.80, clear_rates[claim]
