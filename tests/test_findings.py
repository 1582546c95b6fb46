"""Findings are computed from the data: constructed tables with a known effect must give
the matching verdict, and no effect must give an inconclusive one."""

import numpy as np
import pandas as pd
import pytest

from mergescale.findings import (
    bootstrap_mean,
    claim_held_out,
    claim_larger_merge_easier,
    claim_methods_alike,
    claim_more_experts,
    claim_strong_bases,
    findings_markdown,
)
from mergescale.plots import plot_base_quality, plot_merged_vs_multitask, plot_normalized_vs_k

SIZES = {"s": 1_000, "l": 8_000}


def _table(effect_of_size=0.0, effect_of_quality=0.0, slope=-0.1, slope_gain=0.0,
           method_gap=0.2, noise=0.02, seed=0):
    """normalized.csv rows for 2 sizes x 2 qualities x 3 methods x k in {2,4,6} x 4 subsets."""
    rng = np.random.default_rng(seed)
    rows = []
    for size, params in SIZES.items():
        large = size == "l"
        for quality in ("pretrained", "instruct"):
            base = f"{size}-{quality}"
            rows.append({"base": base, "size": size, "quality": quality, "parameters": params,
                         "method": "base", "reference": True, "combo": "k2s0", "k": 2,
                         "held_in_raw": 0.1 + (0.2 if quality == "instruct" else 0) + (0.1 if large else 0),
                         "held_out_raw": 0.2, "held_in_normalized": 0.1, "held_out_normalized": 1.0,
                         "held_in_vs_multitask": 0.1, "held_out_vs_multitask": 1.0})
            for m, method in enumerate(("a", "b", "c")):
                for k in (2, 4, 6):
                    for s in range(4):
                        hi = (0.8 + slope * (k - 2) / 2 + (slope_gain * (k - 2) / 2 if large else 0)
                              + (effect_of_size if large else 0)
                              + (effect_of_quality if quality == "instruct" else 0)
                              - method_gap * m * (0.25 if large else 1.0)
                              + rng.normal(0, noise))
                        rows.append({"base": base, "size": size, "quality": quality,
                                     "parameters": params, "method": method, "reference": False,
                                     "combo": f"k{k}s{s}", "k": k, "held_in_raw": hi,
                                     "held_out_raw": 0.3, "held_in_normalized": hi,
                                     "held_out_normalized": 1.2 + rng.normal(0, noise),
                                     "held_in_vs_multitask": hi,
                                     "held_out_vs_multitask": 0.9 + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_bootstrap_of_constant_is_exact():
    mean, low, high = bootstrap_mean(np.full(10, 0.3))
    assert mean == low == high == pytest.approx(0.3)
    assert np.isnan(bootstrap_mean(np.array([0.5]))[1])


def test_size_effect_is_found_and_its_absence_is_not():
    # method_gap=0: the table's method gaps also differ by size, which is another effect
    verdicts = [c.verdict for c in claim_larger_merge_easier(_table(effect_of_size=0.1, method_gap=0))]
    assert verdicts == ["supported", "supported"]
    (flip,) = {c.verdict for c in claim_larger_merge_easier(_table(effect_of_size=-0.1, method_gap=0))}
    assert flip == "refuted"
    none = claim_larger_merge_easier(_table(effect_of_size=0.0, method_gap=0.0, noise=0.05))
    assert all(c.verdict.startswith("inconclusive") for c in none)


def test_strong_base_claim_orders_bases_by_zero_shot_strength():
    results = claim_strong_bases(_table(effect_of_quality=0.15))
    held_in = [c for c in results if "held_in_normalized" in c.label]
    assert len(held_in) == 2  # one pair per size
    assert all(c.verdict == "supported" and c.mean == pytest.approx(0.15, abs=0.02) for c in held_in)
    assert all("instruct" in c.label.split(" - ")[0] for c in held_in)


def test_held_out_claims_against_base_and_multitask():
    results = {c.label: c for c in claim_held_out(_table())}
    vs_base = [c for label, c in results.items() if "/ base" in label]
    vs_mt = [c for label, c in results.items() if "multitask" in label]
    assert all(c.verdict == "supported" and c.mean == pytest.approx(0.2, abs=0.02) for c in vs_base)
    assert all(c.verdict == "refuted" for c in vs_mt)


def test_more_experts_compares_slopes():
    (c, *_rest) = claim_more_experts(_table(slope=-0.1, slope_gain=0.08))
    assert c.verdict == "supported"
    assert c.mean == pytest.approx(0.08 / 2, abs=0.01)  # per extra expert: the table steps k by 2


def test_methods_alike_spread_shrinks_with_size():
    comparisons, spreads = claim_methods_alike(_table(method_gap=0.2))
    shrink = [c for c in comparisons if c.label.startswith("method spread")]
    assert len(shrink) == 2 and all(c.verdict == "supported" for c in shrink)
    assert set(spreads.best) == {"a"} and set(spreads.worst) == {"c"}


def test_findings_document_and_figures(tmp_path):
    table = _table(effect_of_size=0.1, effect_of_quality=0.1)
    text = findings_markdown(table)
    for n in range(1, 6):
        assert f"## {n}." in text
    assert "supported" in text
    plot_normalized_vs_k(table, "instruct", tmp_path / "nk.png")
    plot_merged_vs_multitask(table, tmp_path / "mt.png")
    plot_base_quality(table, tmp_path / "bq.png")
    for name in ("nk", "mt", "bq"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"{name}.pdf").exists()
