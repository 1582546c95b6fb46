"""Findings: the statistics (Holm, resampling weights, method variance, verdict rules)
on known answers, and the claims on simulated studies (tests/simulate_study.py) and
through `mergescale findings`. Calibration over many simulated worlds:
test_findings_calibration.py."""

import json

import numpy as np
import pandas as pd
import pytest

from mergescale.cli import main
from mergescale.report.findings import Study, analyse, findings_markdown, method_variance
from mergescale.report.inference import (
    EQUIVALENT, INCONCLUSIVE, REFUTED, SUPPORTED, ClaimResult, Comparison, claim_verdict, decide,
    draw_weights, holm)
from mergescale.report.plots import plot_base_quality, plot_merged_vs_multitask, plot_normalized_vs_k
from simulate_study import Truth, simulate_study

CLEAR = Truth(quality_step=0.1, size_gain=0.1, held_out_gain=0.1, k_slope_gain=0.02, method_sd_small=0.08)


def test_holm_known_answer():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


def test_rescaled_weights_give_the_unbiased_variance_of_a_mean():
    present = np.ones((1, 3))
    draws = draw_weights(present, np.zeros(3), n_bootstrap=20000, seed=1)
    assert (draws.replicates[0] == 1).all() and (draws.subsets[0] == 1).all()
    assert draws.replicates[1:].sum(axis=2) == pytest.approx(3)   # weights keep the total
    values = np.array([0.2, 0.5, 0.9])
    means = draws.replicates[1:, 0] @ values / 3
    assert means.var() == pytest.approx(values.var(ddof=1) / 3, rel=0.05)
    again = draw_weights(present, np.zeros(3), n_bootstrap=20000, seed=1)
    assert (again.replicates == draws.replicates).all()   # seeded, deterministic


def test_subsets_are_resampled_within_their_k():
    draws = draw_weights(np.ones((2, 3)), np.array([2, 2, 2, 4]), n_bootstrap=500, seed=0)
    assert draws.subsets[1:, :3].sum(axis=1) == pytest.approx(3)
    assert (draws.subsets[:, 3] == 1).all()   # one subset at k=4: nothing to resample


def test_method_variance_removes_the_noise():
    rng = np.random.default_rng(0)
    offsets = np.array([0.1, 0.0, -0.05, -0.05])
    exact = method_variance(np.tile(offsets, (30, 1)) + rng.normal(0, 1, (30, 1)), np.ones((1, 30)))
    assert exact[0] == pytest.approx(offsets.var(ddof=1))   # unit effects cancel
    noise_only = [method_variance(rng.normal(0, 0.2, (30, 4)), np.ones((1, 30)))[0] for _ in range(2000)]
    assert abs(np.mean(noise_only)) < 0.0005   # raw between-method variance would be 0.2^2/30 = 0.0013


def _comparison(estimate, spread, replicates=3, direction=1):
    draws = np.concatenate([[estimate], estimate + np.linspace(-spread, spread, 201)])
    return Comparison(1, "c", draws, replicates, replicates - 1, direction)


def test_verdict_rules():
    big, tiny, flipped, noisy, single = (_comparison(0.2, 0.01), _comparison(0.005, 0.001),
                                         _comparison(-0.2, 0.01), _comparison(0.1, 1.0),
                                         _comparison(0.2, 0.01, replicates=1))
    decide([big, tiny, flipped, noisy, single])
    assert big.verdict == SUPPORTED and flipped.verdict == REFUTED
    assert tiny.verdict == EQUIVALENT and noisy.verdict == INCONCLUSIVE
    assert single.verdict == INCONCLUSIVE and "one checkpoint" in single.note
    assert big.low > 0 and noisy.low < 0 < noisy.high
    both = ClaimResult(1, "t", [big, flipped])
    claim_verdict(both)
    assert both.verdict == INCONCLUSIVE and both.summary.startswith("Mixed")


def test_a_significant_effect_inside_the_rope_is_not_supported():
    small = _comparison(0.01, 0.002)
    decide([small])
    assert small.p_holm < 0.05 and small.verdict == EQUIVALENT


def test_clear_effects_are_supported_and_a_null_world_is_not():
    _, clear = analyse(simulate_study(np.random.default_rng(3), CLEAR), n_bootstrap=300)
    assert [r.verdict for r in clear] == [SUPPORTED] * 5
    _, null = analyse(simulate_study(np.random.default_rng(4)), n_bootstrap=300)
    assert not {r.verdict for r in null} & {SUPPORTED, REFUTED}


def test_single_checkpoints_get_no_verdict_and_the_text_says_so():
    table = simulate_study(np.random.default_rng(5), CLEAR, replicates=1)
    _, results = analyse(table, n_bootstrap=200)
    assert {r.verdict for r in results} == {INCONCLUSIVE}
    text = findings_markdown(table, n_bootstrap=200)
    assert "## What this grid can and cannot test" in text
    assert "describe single checkpoints" in text
    for n in range(1, 6):
        assert f"## {n}." in text


def test_measured_zero_shot_order_is_checked_against_the_labels():
    table = simulate_study(np.random.default_rng(6))
    is_short_base = (table.method == "base") & (table.quality == "short")
    table.loc[is_short_base, ["held_in_raw", "held_out_raw"]] = 0.9   # short looks strongest
    _, results = analyse(table, n_bootstrap=100)
    assert any("disagrees with the labels" in n and "pretrained" in n for n in results[0].notes)


def test_method_claim_uses_the_papers_four_methods_only():
    table = simulate_study(np.random.default_rng(7))
    other = table[table.method == "ties"].assign(method="twin_merging")
    other["held_in_ratio_of_sums"] += np.where(other["size"] == "s", 0.5, 0.0)   # far off at size s
    _, alone = analyse(table, n_bootstrap=100)
    _, with_other = analyse(pd.concat([table, other]), n_bootstrap=100)
    assert alone[4].comparisons[0].estimate == pytest.approx(with_other[4].comparisons[0].estimate)
    assert "twin_merging" in findings_markdown(pd.concat([table, other]), n_bootstrap=100)


def test_replicate_labels_shared_by_two_bases_are_reported():
    table = simulate_study(np.random.default_rng(8))
    twin = table[table.base == "tiny-s-short-r0"].assign(base="tiny-s-short-copy")
    study = Study.from_table(pd.concat([table, twin]), n_bootstrap=10)
    assert any("share size s, quality short, replicate 0" in n for n in study.notes)


def test_cli_findings_json_and_markdown(tmp_path, capsys):
    csv = tmp_path / "normalized.csv"
    simulate_study(np.random.default_rng(9), CLEAR).to_csv(csv, index=False)
    out = tmp_path / "findings.md"
    assert main(["findings", str(csv), "-o", str(out), "--json", "--bootstrap", "300"]) == 0
    records = json.loads(capsys.readouterr().out)
    claims = {r["claim"]: r for r in records if r["comparison"] == "claim"}
    assert sorted(claims) == [1, 2, 3, 4, 5] and claims[2]["verdict"] == SUPPORTED
    for r in records:
        assert {"claim", "comparison", "estimate", "low", "high", "verdict"} <= set(r)
    assert out.read_text().startswith("# Findings")
    # the same code as the workflow's rule: identical text for identical input
    assert main(["findings", str(csv), "--bootstrap", "300"]) == 0
    assert capsys.readouterr().out.strip() == out.read_text().strip()


def test_cli_findings_bad_input(tmp_path, capsys):
    assert main(["findings", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"base": ["b"], "method": ["ties"]}).to_csv(bad, index=False)
    assert main(["findings", str(bad)]) == 2
    assert "missing column(s)" in capsys.readouterr().err


def test_figures_from_a_study_table(tmp_path):
    table = simulate_study(np.random.default_rng(10), CLEAR)
    table["held_in_vs_multitask"] = table.held_in_normalized
    table["held_out_vs_multitask"] = table.held_out_vs_multitask_ratio_of_sums
    plot_normalized_vs_k(table, "instruct", tmp_path / "nk.png")
    plot_merged_vs_multitask(table, tmp_path / "mt.png")
    plot_base_quality(table, tmp_path / "bq.png")
    for name in ("nk", "mt", "bq"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"{name}.pdf").exists()


def test_base_quality_figure_with_a_quality_that_the_paper_methods_never_merge(tmp_path):
    """A variant quality (e.g. LoRA experts) merged only by other methods at one size: the
    figure leaves its bars out instead of failing on an empty, untyped interval table."""
    table = simulate_study(np.random.default_rng(11), CLEAR)
    lonely = table[table.quality == "instruct"].copy()
    lonely["quality"], lonely["method"] = "lora", "lora_lego"
    table = pd.concat([table, lonely], ignore_index=True)
    # as read back from a CSV whose held-out columns are empty for some rows
    table["held_out_ratio_of_sums"] = table.held_out_ratio_of_sums.astype(object)
    table.loc[table.index[:5], "held_out_ratio_of_sums"] = None
    plot_base_quality(table, tmp_path / "bq.png")
    assert (tmp_path / "bq.png").stat().st_size > 10_000
