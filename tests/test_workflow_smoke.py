"""End-to-end: the whole DAG on config/smoke.yaml (real training, merging, lm-eval).

Checks the tables it produces, that a second run does nothing, and that changing one
merge method (its config or its code) re-runs only that method's jobs.
"""

import json
import os
import re

import pandas as pd
import pytest
import yaml

from workflow_helpers import SMOKE_CONFIG, planned_jobs, planned_outputs

pytestmark = pytest.mark.slow
SMOKE = yaml.safe_load(SMOKE_CONFIG.read_text())
HELD_IN = SMOKE["tasks"]["held_in"]
HELD_OUT = SMOKE["tasks"]["held_out"]
METHODS = SMOKE["merge"]["methods"]


@pytest.fixture
def run_dir(smoke_run):
    return smoke_run


def test_scores_table_is_complete_and_sane(run_dir):
    scores = pd.read_csv(run_dir / "results/tables/scores.csv")
    n_combos = 2  # k=2 and k=3, one subset each
    # per subset: a multitask model, the output ensemble, every method's merge
    n_models = 1 + len(HELD_IN) + n_combos * (2 + len(METHODS))
    assert len(scores) == n_models * (len(HELD_IN) + len(HELD_OUT))
    assert scores.value.between(0, 1).all()
    assert (scores.n == SMOKE["data"]["sizes"]["test"]).all()
    assert set(scores[scores.kind == "merged"].method) == set(METHODS)
    base = scores[scores.kind == "base"].set_index("task").value
    experts = scores[(scores.kind == "expert") & (scores.task == scores.expert_task)].set_index("task").value
    for task in HELD_IN:  # the study is only meaningful if experts learn their task
        assert experts[task] >= base[task] + 0.2, (task, experts[task], base[task])


def test_normalized_table_matches_scores(run_dir):
    scores = pd.read_csv(run_dir / "results/tables/scores.csv")
    norm = pd.read_csv(run_dir / "results/tables/normalized.csv")
    assert set(norm.method) == set(METHODS) | {"multitask", "base", "ensemble"}
    assert set(norm[norm.reference].method) == {"multitask", "base", "ensemble"}
    row = norm[(norm.method == "ties") & (norm.k == 3)].iloc[0]
    merged = scores[(scores.method == "ties") & (scores.combo == row.combo)].set_index("task").value
    experts = scores[(scores.kind == "expert") & (scores.task == scores.expert_task)].set_index("task").value
    expected = sum(merged[t] / experts[t] for t in HELD_IN) / len(HELD_IN)
    assert row.held_in_normalized == pytest.approx(expected)
    assert row.merge_seconds > 0 and row.merge_peak_rss_mb > 0
    summary = (run_dir / "results/tables/summary.md").read_text()
    for method in METHODS:
        assert f"| smoke | pretrained | {method} | 3 |" in summary
    assert "\\begin{tabular}" in (run_dir / "results/tables/summary.tex").read_text()


def test_figures_findings_and_cards_written(run_dir):
    for name in ("normalized_vs_k_pretrained", "merged_vs_multitask", "base_quality", "other_methods"):
        png = run_dir / f"results/plots/{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert png.with_suffix(".pdf").exists()
    findings = (run_dir / "results/findings.md").read_text()
    # one base: claims 1, 2 and 4 need more than one base and say so; 3 is computed
    assert findings.count("Not testable") >= 2 and "size " in findings
    record = json.loads((run_dir / "results/evals/merged/smoke/ties/k2s0/scores.json").read_text())
    assert record["model_card"]["method"] == "ties"
    assert all(len(s["correct"]) == s["n"] for s in record["scores"])


def test_second_run_does_nothing(run_dir):
    assert planned_jobs(run_dir) == {}


def test_changing_one_method_reruns_only_its_jobs(run_dir, tmp_path):
    changed = yaml.safe_load(SMOKE_CONFIG.read_text())
    changed["merge"]["methods"]["ties"]["params"]["density"] = 0.4
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(changed, sort_keys=False))  # same key order: same params
    jobs = planned_jobs(run_dir, config=config)
    # Only ties is merged again. Its subsets' batches (multitask + 4 merges each) are
    # scored again in one job per subset (evaluate.batch), and the batch files split.
    batch = 1 + len(changed["merge"]["methods"])
    assert jobs == {"merge": 2, "evaluate_batch": 2, "unbatch_scores": 2 * batch,
                    "aggregate_scores": 1, "write_findings": 1, "plot_figures": 1, "all": 1}
    assert all("/ties/" in out for out in planned_outputs(run_dir, "merge", config=config))



def test_editing_one_method_file_reruns_only_methods_defined_there(run_dir):
    from pathlib import Path

    from mergescale.merge import get_method

    def source(name):
        return get_method(name).source_file

    path = Path(source("linear"))
    same_file = {m for m, spec in METHODS.items() if source(spec["method"]) == str(path)}
    before, text = path.stat(), path.read_text()
    # Snakemake skips inputs whose checksum is unchanged, so a bare touch is not enough.
    path.write_text(text + "\n# edited\n")
    try:
        outs = planned_outputs(run_dir, "merge")
    finally:
        path.write_text(text)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert outs and {out.split("/")[3] for out in outs} == same_file


def test_tuned_method_uses_the_validation_choice(run_dir):
    """task_arithmetic is tuned in the smoke config: every grid point was scored on the
    validation split, the best was chosen, and the test-split model uses exactly it."""
    from mergescale.merge import get_method

    registered = list(get_method("task_arithmetic").hyperparameter("lambda").grid)
    for combo, k in (("k2s0", 2), ("k3s0", 3)):
        record = json.loads((run_dir / f"results/tuning/smoke/task_arithmetic/{combo}.json").read_text())
        # the registered grid with plain averaging's lambda = 1/k first (once)
        grid = list(dict.fromkeys([round(1 / k, 4), *registered]))
        assert [c["params"]["lambda"] for c in record["candidates"]] == grid
        means = [c["mean"] for c in record["candidates"]]
        assert record["chosen"]["lambda"] == grid[means.index(max(means))]
        for c in record["candidates"]:  # the objective is the mean over the combo's tasks
            assert c["mean"] == pytest.approx(sum(c["validation"].values()) / len(c["validation"]))
        card = json.loads((run_dir / f"results/merged/smoke/task_arithmetic/{combo}/merge_card.json").read_text())
        assert card["params"]["lambda"] == record["chosen"]["lambda"]


def test_report_regenerates_from_existing_scores(run_dir):
    """`make report`'s two commands: only the light rules run, and the HTML report holds
    every figure and table."""
    from workflow_helpers import REPO, snakemake

    makefile = (REPO / "Makefile").read_text()
    rules = makefile.split("REPORT_RULES := ", 1)[1].split("\n", 1)[0].split()
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "results/merged").rglob("*.safetensors")}
    proc = snakemake(run_dir, "--cores", "1", "--allowed-rules", *rules, "--forcerun", "aggregate_scores")
    ran = set(re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, flags=re.M))
    assert {"aggregate_scores", "write_findings", "plot_figures"} <= ran <= set(rules)  # nothing heavy re-ran
    assert before == {p: p.stat().st_mtime_ns for p in (run_dir / "results/merged").rglob("*.safetensors")}
    snakemake(run_dir, "--report", "results/report.html")
    html = (run_dir / "results/report.html").read_text(errors="replace")
    for name in ("summary.md", "normalized_vs_k_pretrained.png", "findings.md", "base_quality.png"):
        assert name in html
    assert planned_jobs(run_dir) == {}


def test_results_page_of_the_run(run_dir, tmp_path):
    """`make report`'s last command on a real run: the results page and its figures."""
    from mergescale.cli import main
    from mergescale.report.findings import TITLES

    out = tmp_path / "docs" / "results.md"
    assert main(["results", str(run_dir / "results"), "-o", str(out), "--bootstrap", "200"]) == 0
    text = out.read_text()
    assert all(f"{n}. {title}" in text for n, title in TITLES.items())
    assert "One base replicate per cell: no interval." in text
    assert "| ties | 2, 3 |" in text   # the paper's four: one row per size and method
    for name in ("normalized_vs_k_pretrained", "base_quality", "merged_vs_multitask"):
        png = tmp_path / "docs" / "figures" / f"{name}.png"
        assert f"(figures/{name}.png)" in text and 5_000 < png.stat().st_size < 150_000
