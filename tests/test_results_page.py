"""The results page (`mergescale results`), its figures and the run record, on simulated
studies laid out as the aggregate rule writes normalized.csv."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as sps

from mergescale.cli import main
from mergescale.report.findings import PAPER_METHODS, TITLES
from mergescale.report.plots import (
    METHOD_COLOURS, plot_base_quality, plot_merged_vs_multitask, plot_normalized_vs_k,
    plot_other_methods)
from mergescale.report.replicates import interval_note, over_replicates
from mergescale.report.results_page import render_results_page
from mergescale.report.run_record import RunRecordError, record_step
from mergescale.report.findings import FindingsInputError
from mergescale.report.world import per_base, quality_gaps, read_scores, world_lines, world_table
from simulate_study import (
    HELD_IN, HELD_OUT_OFFSETS, LEAST_GAIN, OTHER_METHODS, QUALITIES, QUALITY_GAP, WORLD_LEVEL,
    Truth, simulate_normalized, simulate_scores, simulate_task_vectors)

CLEAR = Truth(quality_step=0.1, size_gain=0.1, held_out_gain=0.1, k_slope_gain=0.02, method_sd_small=0.08)
BOOTSTRAP = 200  # enough for the page's shape; the statistics are tested in test_findings.py


def write_run(root, table, scores=None, task_vectors=None):
    (root / "tables").mkdir(parents=True)
    table.to_csv(root / "tables" / "normalized.csv", index=False)
    if scores is not None:
        scores.to_csv(root / "tables" / "scores.csv", index=False)
    for base, record in (task_vectors or {}).items():
        (root / "tables" / "task_vectors").mkdir(exist_ok=True)
        (root / "tables" / "task_vectors" / f"{base}.json").write_text(json.dumps(record))
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A replicated study (3 sizes x 3 qualities x 3 replicates x the paper's four), an
    other-methods grid beside it (one size, 3 replicates), a run record, the page."""
    root = tmp_path_factory.mktemp("study")
    results = write_run(root / "results", simulate_normalized(np.random.default_rng(3), CLEAR),
                        simulate_scores(), simulate_task_vectors())
    methods = write_run(root / "results-methods" / "results", simulate_normalized(
        np.random.default_rng(4), CLEAR, other_methods=OTHER_METHODS, sizes=("m",)))
    record = results / "run.json"
    record_step(record, "install", "2026-12-03T12:00:00Z", "2026-12-03T12:06:10Z", new=True)
    record_step(record, "config/study.yaml", "2026-12-03T12:06:10Z", "2026-12-03T14:01:00Z",
                config="config/study.yaml")
    record_step(record, "config/study-methods.yaml", "2026-12-03T14:01:00Z", "2026-12-03T14:20:30Z",
                config="config/study-methods.yaml", results=str(methods))
    out = root / "docs" / "results.md"
    text = render_results_page(results, out, root / "docs" / "figures", methods, n_bootstrap=BOOTSTRAP)
    return {"root": root, "out": out, "text": text, "record": json.loads(record.read_text())}


def test_page_has_every_claim_with_verdict_estimate_and_interval(study):
    text = study["text"]
    assert study["out"].read_text() == text
    for number, title in TITLES.items():
        assert f"| {number}. {title} | **" in text          # the verdict table
        section = text.split(f"### {number}. {title}", 1)[1].split("### ", 1)[0]
        assert "| comparison | estimate | interval | replicates | verdict |" in section
        rows = [line for line in section.splitlines() if line.startswith("| ") and "[" in line]
        assert rows, f"claim {number}: no comparison with an interval"
    # a clear simulated world: every claim is supported
    assert text.count("| **supported** |") == 5


def test_page_figures_exist_are_small_and_linked(study):
    text, docs = study["text"], study["out"].parent
    links = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    names = {link.split("/")[-1] for link in links}
    assert names == {"normalized_vs_k_short.png", "normalized_vs_k_pretrained.png",
                     "normalized_vs_k_instruct.png", "base_quality.png", "merged_vs_multitask.png",
                     "other_methods.png"}
    for link in links:
        png = docs / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < png.stat().st_size < 150_000, (png, png.stat().st_size)
        with Image.open(png) as image:
            assert image.width >= 600 and image.height >= 300
    assert not list(docs.glob("figures/*.pdf"))   # the page's figures are PNG only
    assert "95% t-interval over 3 base replicates" in text


def test_page_names_date_commit_machine_and_wall_time(study):
    text, record = study["text"], study["record"]
    assert "- Date: 2026-12-03, 12:00 to 14:20 UTC." in text
    assert "- Wall time: 2 h 20 min (install 6 min 10 s; config/study.yaml 1 h 54 min; " \
           "config/study-methods.yaml 19 min 30 s)." in text
    assert record["wall_seconds"] == 8430.0 and record["config"] == "config/study.yaml"
    machine = record["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["ram_gib"] > 0
    assert f"- Machine: {machine['cores']} cores, {machine['cpu']}, {machine['ram_gib']:g} GiB RAM" in text
    assert "- Commit: " in text and "- Config: `config/study.yaml`." in text


def test_page_method_tables(study):
    text = study["text"]
    four, others = text.split("### The paper's four methods", 1)[1].split("### Other methods", 1)
    for method in PAPER_METHODS:
        assert sum(f"| {method} |" in line for line in four.splitlines()) == 3   # one row per size
    assert not any(m in four for m in OTHER_METHODS)
    assert "other-methods grid" in others
    for method in OTHER_METHODS:
        rows = [line for line in others.splitlines() if line.startswith(f"| m | {method} |")]
        assert len(rows) == 1 and rows[0].count("[") == 4     # four scores, each with an interval
    assert "| m | average (paper's four) |" in others


def test_page_of_a_single_replicate_run_says_there_is_no_interval(tmp_path):
    table = simulate_normalized(np.random.default_rng(5), CLEAR, replicates=1,
                                other_methods=OTHER_METHODS[:2], sizes=("s",))
    results = write_run(tmp_path / "results", table)
    text = render_results_page(results, tmp_path / "results.md", n_bootstrap=BOOTSTRAP)
    assert "One base replicate per cell: no interval." in text
    assert "not recorded (the run has no `run.json`" in text
    assert "No `scores.csv` in" in text        # the world: nothing to describe it from
    assert "From this run;" in text and "| s | fisher |" in text     # other methods of the run itself
    assert (tmp_path / "figures" / "other_methods.png").exists()
    for title in TITLES.values():
        assert title in text
    assert "inconclusive" in text


def test_cli_results_and_record_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "results", simulate_normalized(np.random.default_rng(6), sizes=("s", "m")))
    assert main(["record-run", "results/run.json", "--new", "--step", "config/study.yaml",
                 "--config", "config/study.yaml", "--start", "2026-12-03T10:00:00Z"]) == 0
    assert "config/study.yaml took" in capsys.readouterr().out
    assert main(["results", "results", "-o", "docs/results.md", "--figures", "docs/figures",
                 "--bootstrap", str(BOOTSTRAP)]) == 0
    text = (tmp_path / "docs/results.md").read_text()
    assert "(`results/tables/normalized.csv`)" in text and "![Base quality](figures/base_quality.png)" in text
    assert "This run merges with no other method" in text
    assert not (tmp_path / "docs/figures/other_methods.png").exists()
    # bad input: one line naming the file or the value
    assert main(["results", "missing", "-o", "x.md"]) == 2
    assert "missing/tables/normalized.csv" in capsys.readouterr().err
    assert main(["record-run", "r.json", "--step", "x", "--start", "yesterday"]) == 2
    assert "'yesterday' is not an ISO 8601 time" in capsys.readouterr().err


def test_record_run_new_drops_earlier_steps(tmp_path):
    path = tmp_path / "run.json"
    record_step(path, "a", "2026-12-03T10:00:00Z", "2026-12-03T10:01:00Z")
    record_step(path, "b", "2026-12-03T10:01:00Z", "2026-12-03T10:03:30Z")
    assert json.loads(path.read_text())["wall_seconds"] == 210.0
    record = record_step(path, "c", "2026-12-03T11:00:00Z", "2026-12-03T11:00:05Z", new=True)
    assert [s["name"] for s in record["steps"]] == ["c"] and record["wall_seconds"] == 5.0
    path.write_text("{not json")
    with pytest.raises(RunRecordError, match="run.json: not a run record"):
        record_step(path, "d", "2026-12-03T11:00:00Z")


def test_over_replicates_known_answer():
    # 3 replicates; each has two subsets whose mean is its value; one other key
    rows = [{"k": 2, "replicate": r, "value": v + d} for r, v in enumerate([0.5, 0.6, 0.7]) for d in (-0.1, 0.1)]
    rows += [{"k": 4, "replicate": 0, "value": 0.3}, {"k": 4, "replicate": 0, "value": np.nan}]
    s = over_replicates(pd.DataFrame(rows), "value", ["k"]).set_index("k")
    half = sps.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)
    assert s.loc[2, "mean"] == pytest.approx(0.6) and s.loc[2, "replicates"] == 3
    assert (s.loc[2, "low"], s.loc[2, "high"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert s.loc[4, "mean"] == pytest.approx(0.3) and np.isnan(s.loc[4, "low"])   # one replicate
    assert interval_note([3, 3]) == "bars: 95% t-interval over 3 base replicates"
    assert interval_note([1, 1]) == "one base replicate per cell: no interval"
    assert interval_note([1, 3]).endswith("(none where there is one)")


def test_workflow_figures_from_a_study_table(tmp_path):
    """The plot rule's figures: PNG and PDF each, the interval note from the replicates, and
    one fixed colour per method of the paper's four (colour-blind-safe palette)."""
    table = simulate_normalized(np.random.default_rng(7), CLEAR, other_methods=OTHER_METHODS[:3])
    notes = [plot_normalized_vs_k(table, "instruct", tmp_path / "nk.png"),
             plot_merged_vs_multitask(table, tmp_path / "mt.png"),
             plot_base_quality(table, tmp_path / "bq.png"),
             plot_other_methods(table, tmp_path / "om.png")]
    assert notes == ["bars: 95% t-interval over 3 base replicates"] * 4
    for name in ("nk", "mt", "bq", "om"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"{name}.pdf").exists()
    assert set(METHOD_COLOURS) >= set(PAPER_METHODS)
    assert len({METHOD_COLOURS[m] for m in PAPER_METHODS}) == 4


@pytest.mark.parametrize("sizes", [("s",), ("s", "m", "l")])
def test_figures_clip_nothing(sizes, monkeypatch, tmp_path):
    """Every title, label, tick label and legend entry lies inside the figure, and the
    legend overlaps no panel: the faults of the earlier figures (a title cut at both ends,
    a legend over the x label and cut at the left)."""
    import matplotlib.text

    import mergescale.report.plots as plots

    checked = []

    def check(fig, out, small=False):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        # the bounding box of everything drawn (ticks outside the view limits are not drawn)
        drawn, size = fig.get_tightbbox(renderer), fig.get_size_inches()
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, (out.name, drawn)
        assert drawn.x1 <= size[0] + 0.01 and drawn.y1 <= size[1] + 0.01, (out.name, drawn)
        titles = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip()]
        assert titles
        for legend in fig.legends:
            frame = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not frame.overlaps(ax.get_window_extent(renderer)), out.name
        checked.append(out.name)
        plots.plt.close(fig)

    monkeypatch.setattr(plots, "_save", check)
    table = simulate_normalized(np.random.default_rng(8), CLEAR, other_methods=OTHER_METHODS, sizes=sizes)
    plot_normalized_vs_k(table, "instruct", tmp_path / "nk.png")
    plot_merged_vs_multitask(table, tmp_path / "mt.png")
    plot_base_quality(table, tmp_path / "bq.png")
    plot_other_methods(table, tmp_path / "om.png")
    assert checked == ["nk.png", "mt.png", "bq.png", "om.png"]


def _k2_best(normalized, base):
    """Independently of the report code: per method of the paper's four, the mean held-in
    ratio of sums over the base's k = 2 subsets; the best method's."""
    means = []
    for method in PAPER_METHODS:
        values = [v for b, m, k, ref, v in zip(normalized.base, normalized.method, normalized.k,
                                               normalized.reference, normalized.held_in_ratio_of_sums)
                  if b == base and m == method and k == 2 and not ref]
        if values:
            means.append(sum(values) / len(values))
    return max(means)


def test_world_table_known_truth():
    """Per (size, quality), over 3 replicates: the simulated world's formulas
    (tests/simulate_study.py) give each measure's mean and range, and the checks."""
    normalized = simulate_normalized(np.random.default_rng(9), CLEAR)
    table = world_table(per_base(simulate_scores(), normalized, simulate_task_vectors()))
    assert len(table) == 9 and (table.n == 3).all()
    assert list(table["size"]) == ["s"] * 3 + ["m"] * 3 + ["l"] * 3      # by parameters
    assert list(table.quality[:3]) == list(QUALITIES)                      # weaker to stronger
    for _, row in table.iterrows():
        q, size = QUALITIES.index(row.quality), row["size"]
        held_out = [WORLD_LEVEL + QUALITY_GAP[size] * q + 0.01 * r for r in range(3)]
        assert row.held_out_zero_shot == pytest.approx(np.mean(held_out))
        assert (row.held_out_zero_shot_min, row.held_out_zero_shot_max) == pytest.approx(
            (held_out[0], held_out[2]))
        assert row.held_in_zero_shot == pytest.approx(0.05 + 0.02 * np.mean(range(len(HELD_IN))))
        # expert j gains LEAST_GAIN + 0.1 j + 0.005 r: the least is expert 0 of replicate 0
        assert row.expert_gain_mean == pytest.approx(LEAST_GAIN[size] + 0.25 + 0.005)
        assert row.expert_gain_min == pytest.approx(LEAST_GAIN[size] + 0.005)
        assert row.expert_gain_min_min == pytest.approx(LEAST_GAIN[size])
        assert row.relative_norm == pytest.approx(0.08 + 0.025 + 0.001)
        assert row.cosine == pytest.approx(0.21)
        assert (row.multitask_held_in, row.multitask_held_in_min, row.multitask_held_in_max) == \
            pytest.approx((0.89, 0.88, 0.90))
        k2 = [_k2_best(normalized, f"tiny-{size}-{row.quality}-r{r}") for r in range(3)]
        assert (row.k2_best_of_four, row.k2_best_of_four_min, row.k2_best_of_four_max) == \
            pytest.approx((np.mean(k2), min(k2), max(k2)))
        assert row.held_out_ok == (np.mean(held_out) >= 0.2)
        assert row.gains_ok == (LEAST_GAIN[size] >= 0.3)
        assert row.k2_ok == (np.mean(k2) >= 0.6)
    assert sum(HELD_OUT_OFFSETS) == 0          # so the held-out mean is the formula's level
    gaps = quality_gaps(table).set_index("size")
    assert gaps.loc["s", "gap"] == pytest.approx(0.2) and gaps.loc["s", "ok"]
    assert (gaps.loc["s", "weaker"], gaps.loc["s", "stronger"]) == ("short", "instruct")
    assert gaps.loc["m", "gap"] == pytest.approx(0.08) and not gaps.loc["m", "ok"]
    assert gaps.loc["l", "gap"] == pytest.approx(0.0) and not gaps.loc["l", "ok"]


def test_world_table_keeps_the_multitask_model_on_all_held_in_tasks():
    """A base with the multitask model on all held-in tasks and per-subset ones: the page
    reads the first; a base with per-subset models only: their mean."""
    scores = simulate_scores(replicates=1, sizes=("s",))
    multi = scores[scores.kind == "multitask"]
    subset = multi.assign(combo="k2s0", value=0.5, trained_on=multi.task.isin(HELD_IN[:2]))
    only_subsets = subset[subset.base == "tiny-s-short-r0"]
    other = subset.assign(combo="k2s1", value=0.7)[subset.base == "tiny-s-short-r0"]
    scores = pd.concat([scores[~((scores.kind == "multitask") & (scores.base == "tiny-s-short-r0"))],
                        only_subsets, other, subset[subset.base != "tiny-s-short-r0"]])
    bases = per_base(scores, simulate_normalized(np.random.default_rng(10), sizes=("s",), replicates=1))
    multitask = bases.set_index("base").multitask_held_in
    assert multitask["tiny-s-short-r0"] == pytest.approx(0.6)           # (0.5 + 0.7) / 2
    assert multitask["tiny-s-pretrained-r0"] == pytest.approx(0.9)      # the model on all of them


def test_page_world_section(study):
    section = study["text"].split("## The world", 1)[1].split("## The five claims", 1)[0]
    header = ("| size | quality | n | held-out zero-shot | held-in zero-shot | expert gain | "
              "smallest expert gain | ‖τ‖ ÷ ‖θ_base‖ | cos(τ_i, τ_j) | multitask held-in | "
              "k = 2 best of four | checks |")
    assert header in section
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in section.splitlines() if line.startswith("| ") and "size" not in line}
    assert len(rows) == 9
    # size s, short: held-out 0.14 + 0.01 r; experts gain 0.25 + 0.1 j + 0.005 r
    n, held_out, held_in, gain, least, norm, cosine, multitask, k2, checks = rows[("s", "short")]
    assert (n, held_out, held_in) == ("3", "0.150 (0.140 to 0.160)", "0.100")
    assert (gain, least) == ("0.505 (0.500 to 0.510)", "0.255 (0.250 to 0.260)")
    assert (norm, cosine, multitask) == ("0.106 (0.105 to 0.107)", "0.210 (0.200 to 0.220)",
                                         "0.890 (0.880 to 0.900)")
    assert float(k2.split()[0]) >= 0.6                 # the clear simulated world merges well
    assert checks == "miss: held-out, expert gain"
    assert rows[("s", "instruct")][-1] == "miss: expert gain"
    assert rows[("m", "pretrained")][-1] == "miss: held-out"         # 0.19 on average
    assert rows[("m", "instruct")][-1] == "pass"
    assert "at least 0.2; every expert's gain" in section and "at least 0.6" in section
    assert "the paper's four methods (average, task_arithmetic, ties, dare_ties)" in section
    assert ("- Size s: held-out zero-shot short 0.150, pretrained 0.250, instruct 0.350; "
            "largest gap in label order +0.200 (instruct − short), pass.") in section
    assert "- Size m: held-out zero-shot short 0.150, pretrained 0.190, instruct 0.230; " \
           "largest gap in label order +0.080 (instruct − short), miss." in section


def test_world_lines_without_task_vectors_or_k2(tmp_path):
    """What a run lacks is said, not filled in: no task-vector columns, k = 2 n/a."""
    normalized = simulate_normalized(np.random.default_rng(11), CLEAR, replicates=1, sizes=("m",))
    normalized = normalized[normalized.k != 2]
    results = write_run(tmp_path / "results", normalized, simulate_scores(replicates=1, sizes=("m",)))
    text = "\n".join(world_lines(results, normalized))
    assert "‖τ‖" not in text and "Task vectors: not measured in this run" in text
    instruct = next(line for line in text.splitlines() if line.startswith("| m | instruct |"))
    # one replicate: the mean alone; held-out 0.14 + 2 x 0.04 = 0.22, least gain 0.35
    assert instruct == "| m | instruct | 1 | 0.220 | 0.100 | 0.600 | 0.350 | 0.900 | n/a | pass (n/a: k = 2) |"
    scores = simulate_scores(replicates=1, sizes=("m",))
    scores[scores.kind != "base"].to_csv(results / "tables" / "scores.csv", index=False)
    assert "has no base model's scores" in world_lines(results, normalized)[0]
    (results / "tables" / "scores.csv").write_text("kind,base,value\nbase,b,0.1\n")
    with pytest.raises(FindingsInputError, match=r"scores.csv: missing column\(s\) task, role, size, quality"):
        read_scores(results / "tables" / "scores.csv")
