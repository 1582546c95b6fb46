"""Known-answer tests of normalisation on hand-written scores.json files."""

import json

import pytest

import pandas as pd

from mergescale.report.aggregate import normalized_scores, summary_latex, summary_markdown, tidy_scores

HELD_IN = ["first_letter", "max_digit"]
HELD_OUT = ["second_letter", "min_digit"]
COMBOS = {"k2s0": ["first_letter", "max_digit"]}


def _write(root, model, values):
    path = root / "results" / "evals" / model / "scores.json"
    path.parent.mkdir(parents=True)
    scores = [{"task": t, "split": "test", "metric": "exact_match", "value": v, "stderr": 0.01,
               "n": 10, "correct": []} for t, v in values.items()]
    card = {"model_card": {"wall_time_s": 1.5, "peak_rss_bytes": 2**20 * 300}} if "merged" in model else {}
    path.write_text(json.dumps({"scores": scores, **card}))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return [
        _write(tmp_path, "bases/b", {"first_letter": 0.1, "max_digit": 0.5, "second_letter": 0.2, "min_digit": 0.0}),
        _write(tmp_path, "experts/b/first_letter", {"first_letter": 1.0, "max_digit": 0.4, "second_letter": 0.1, "min_digit": 0.1}),
        _write(tmp_path, "experts/b/max_digit", {"first_letter": 0.1, "max_digit": 0.8, "second_letter": 0.1, "min_digit": 0.3}),
        _write(tmp_path, "multitask/b/k2s0", {"first_letter": 0.9, "max_digit": 0.8, "second_letter": 0.4, "min_digit": 0.2}),
        _write(tmp_path, "merged/b/ties/k2s0", {"first_letter": 0.5, "max_digit": 0.6, "second_letter": 0.3, "min_digit": 0.2}),
    ]


def test_tidy_scores_labels_roles(files):
    df = tidy_scores(files, HELD_IN, HELD_OUT, COMBOS)
    assert len(df) == 5 * 4
    expert = df[(df.kind == "expert") & (df.expert_task == "max_digit")]
    assert set(expert[expert.trained_on].task) == {"max_digit"}
    merged = df[df.kind == "merged"]
    assert set(merged[merged.trained_on].task) == {"first_letter", "max_digit"}
    assert set(merged[merged.role == "held_out"].task) == set(HELD_OUT)
    assert merged.merge_seconds.iloc[0] == 1.5 and merged.merge_peak_rss_mb.iloc[0] == 300


def test_normalisation_known_answer(files):
    df = tidy_scores(files, HELD_IN, HELD_OUT, COMBOS)
    norm = normalized_scores(df, HELD_IN, HELD_OUT, COMBOS).set_index("method")
    ties = norm.loc["ties"]
    assert ties.held_in_normalized == pytest.approx((0.5 / 1.0 + 0.6 / 0.8) / 2)
    # min_digit's base score is 0: that ratio is undefined, dropped and counted
    assert ties.held_out_normalized == pytest.approx(0.3 / 0.2)
    assert ties.held_out_zero_base_tasks == 1
    assert ties.held_in_vs_multitask == pytest.approx((0.5 / 0.9 + 0.6 / 0.8) / 2)
    assert ties.held_out_vs_multitask == pytest.approx((0.3 / 0.4 + 0.2 / 0.2) / 2)
    assert ties.held_in_raw == pytest.approx(0.55) and ties.k == 2
    multitask = norm.loc["multitask"]
    assert multitask.held_in_normalized == pytest.approx((0.9 + 1.0) / 2)


def test_summary_mentions_every_method_and_gain(files):
    df = tidy_scores(files, HELD_IN, HELD_OUT, COMBOS)
    text = summary_markdown(df, normalized_scores(df, HELD_IN, HELD_OUT, COMBOS), HELD_IN, HELD_OUT)
    assert "| b | b |  | ties | 2 | 1 | 0.625 |" in text
    assert "+0.900" in text  # first_letter expert gain 1.0 - 0.1


def test_base_labels_reach_every_row_and_latex(files):
    labels = {"b": {"size": "0.1M", "quality": "instruct", "parameters": 123}}
    df = tidy_scores(files, HELD_IN, HELD_OUT, COMBOS, labels)
    assert set(df["size"]) == {"0.1M"} and set(df.quality) == {"instruct"}
    norm = normalized_scores(df, HELD_IN, HELD_OUT, COMBOS)
    # references per subset: the base's zero-shot row and the subset's multitask model
    assert set(norm.method) == {"base", "multitask", "ties"}
    assert norm.set_index("method").loc["base"].held_in_normalized == pytest.approx((0.1 / 1.0 + 0.5 / 0.8) / 2)
    assert set(norm[norm.reference].method) == {"base", "multitask"}
    # merge cost comes from merge cards only, never a multitask training card
    assert norm.set_index("method").loc["multitask"].merge_seconds is None or \
        pd.isna(norm.set_index("method").loc["multitask"].merge_seconds)
    tex = summary_latex(norm)
    assert "\\begin{tabular}" in tex and "ties" in tex and "0.625" in tex


def test_ratio_of_sums_and_raw_differences_beside_mean_of_ratios(files):
    df = tidy_scores(files, HELD_IN, HELD_OUT, COMBOS)
    ties = normalized_scores(df, HELD_IN, HELD_OUT, COMBOS).set_index("method").loc["ties"]
    assert ties.held_in_ratio_of_sums == pytest.approx((0.5 + 0.6) / (1.0 + 0.8))
    # the zero base score of min_digit stays in the sums: 0.5 / 0.2, no task dropped
    assert ties.held_out_ratio_of_sums == pytest.approx((0.3 + 0.2) / (0.2 + 0.0))
    assert ties.held_out_minus_base == pytest.approx(((0.3 - 0.2) + (0.2 - 0.0)) / 2)
    assert ties.held_in_minus_expert == pytest.approx(((0.5 - 1.0) + (0.6 - 0.8)) / 2)
    assert ties.held_in_vs_multitask_ratio_of_sums == pytest.approx(1.1 / 1.7)
    assert ties.held_out_vs_multitask_ratio_of_sums == pytest.approx(0.5 / 0.6)
    assert ties.held_out_minus_multitask == pytest.approx(((0.3 - 0.4) + (0.2 - 0.2)) / 2)
    assert ties.held_in_low_multitask_tasks == 0 and ties.held_out_low_multitask_tasks == 0


def test_vs_multitask_only_where_the_multitask_model_is_above_chance(tmp_path):
    files = [
        _write(tmp_path, "bases/b", {"first_letter": 0.1, "max_digit": 0.5, "second_letter": 0.2, "min_digit": 0.3}),
        _write(tmp_path, "experts/b/first_letter", {"first_letter": 1.0, "max_digit": 0.4, "second_letter": 0.1, "min_digit": 0.1}),
        _write(tmp_path, "experts/b/max_digit", {"first_letter": 0.1, "max_digit": 0.8, "second_letter": 0.1, "min_digit": 0.3}),
        # the multitask model forgot min_digit (0.01 < chance threshold 0.05)
        _write(tmp_path, "multitask/b/k2s0", {"first_letter": 0.9, "max_digit": 0.8, "second_letter": 0.4, "min_digit": 0.01}),
        _write(tmp_path, "merged/b/ties/k2s0", {"first_letter": 0.5, "max_digit": 0.6, "second_letter": 0.3, "min_digit": 0.2}),
    ]
    df = tidy_scores(files, HELD_IN, HELD_OUT, COMBOS)
    ties = normalized_scores(df, HELD_IN, HELD_OUT, COMBOS).set_index("method").loc["ties"]
    assert ties.held_out_vs_multitask == pytest.approx(0.3 / 0.4)  # 0.2 / 0.01 = 20 is not averaged in
    assert ties.held_out_vs_multitask_ratio_of_sums == pytest.approx(0.3 / 0.4)
    assert ties.held_out_low_multitask_tasks == 1
    assert ties.held_out_minus_multitask == pytest.approx(((0.3 - 0.4) + (0.2 - 0.01)) / 2)


def test_the_multitask_model_on_all_held_in_tasks_is_every_subsets_reference(files, tmp_path):
    """The paper's reference: one multitask model per base (results/.../multitask/b/all)
    stands for every subset that has no multitask model of its own."""
    files = [f for f in files if "evals/multitask" not in f]
    files.append(_write(tmp_path / "all", "multitask/b/all",
                        {"first_letter": 0.9, "max_digit": 0.8, "second_letter": 0.4, "min_digit": 0.2}))
    df = tidy_scores(files, HELD_IN, HELD_OUT, COMBOS)
    row = df[df.kind == "multitask"].iloc[0]
    assert row.combo == "all" and pd.isna(row.k) and row.trained_on
    norm = normalized_scores(df, HELD_IN, HELD_OUT, COMBOS).set_index("method")
    assert norm.loc["ties"].held_in_vs_multitask == pytest.approx((0.5 / 0.9 + 0.6 / 0.8) / 2)
    assert norm.loc["multitask"].combo == "k2s0"  # listed under the subset it is compared with
    assert norm.loc["multitask"].held_in_normalized == pytest.approx((0.9 + 1.0) / 2)
