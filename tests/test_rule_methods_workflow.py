"""End-to-end: the OPCM and MAP rule-methods on a small slice of the DAG (two held-in
experts, k=2, one subset), through the real workflow: training, batched lm-eval scoring
inside the method jobs, the generic evaluation of their outputs, tables and figures."""

import json

import pandas as pd
import pytest
import yaml

from workflow_helpers import SMOKE_CONFIG, planned_jobs, snakemake

pytestmark = pytest.mark.slow


def _config(tmp_path):
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["tasks"]["held_in"] = ["last_letter", "next_letter"]
    config["merge"]["ks"] = [2]
    config["merge"]["methods"] = {
        "average": {"method": "linear"},
        "opcm": {"rule": "opcm", "params": {"alpha": 0.5, "orders": 2, "baseline_lambda": 0.5}},
        "map": {"rule": "map", "params": {"extra_probes": 1, "front_points": 3, "grid": 11}},
    }
    path = tmp_path / "rule_methods.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rule_methods")
    config_path, config = _config(workdir)
    snakemake(workdir, "--cores", "2", config=config_path)
    return workdir, config_path, config


def _expert_test_score(workdir, task):
    scores = json.loads((workdir / f"results/evals/experts/smoke/{task}/scores.json").read_text())["scores"]
    return next(s["value"] for s in scores if s["task"] == task and s["split"] == "test")


def test_outputs_follow_the_merge_contract(run):
    workdir, _, _ = run
    for method in ("opcm", "map"):
        out = workdir / f"results/merged/smoke/{method}/k2s0"
        card = json.loads((out / "merge_card.json").read_text())
        assert card["method"] == method and card["wall_time_s"] > 0 and card["peak_rss_bytes"] > 0
        assert (out / "model.safetensors").exists() and (out / "config.json").exists()
        assert (out / "README.md").read_text().startswith(f"# Merged model: {method}")
    norm = pd.read_csv(workdir / "results/tables/normalized.csv")
    assert {"average", "opcm", "map"} <= set(norm.method)
    assert norm[norm.method.isin(["opcm", "map"])].merge_seconds.gt(0).all()
    summary = (workdir / "results/tables/summary.md").read_text()
    assert "| smoke | pretrained | opcm | 2 |" in summary and "| smoke | pretrained | map | 2 |" in summary


def test_continual_curves(run):
    workdir, _, config = run
    curves = pd.read_csv(workdir / "results/continual/smoke/k2s0/opcm.csv")
    # 2 orders x 3 methods x (1 + 2) tasks scored over the two arrivals
    assert len(curves) == 18 and set(curves.method) == {"opcm", "average", "task_arithmetic"}
    assert set(curves.arrival) == {"last_letter>next_letter", "next_letter>last_letter"}
    assert (curves.n == config["data"]["sizes"]["test"]).all()
    first = curves[curves.step == 1].pivot_table(index=["order", "task"], columns="method", values="score")
    # after one arrival OPCM and averaging are that expert: the batched scores must equal
    # the expert's own evaluation by the generic evaluate rule
    assert (first.opcm == first.average).all()
    for (_, task), row in first.iterrows():
        assert row.opcm == pytest.approx(_expert_test_score(workdir, task))
    final = curves[(curves.step == 2) & (curves.order == 0) & (curves.method == "opcm")].set_index("task").score
    merged = json.loads((workdir / "results/evals/merged/smoke/opcm/k2s0/scores.json").read_text())["scores"]
    # the contract checkpoint is OPCM over order 0: same scores as its last intermediate merge
    assert {s["task"]: s["value"] for s in merged if s["task"] in final.index} == final.to_dict()
    table = pd.read_csv(workdir / "results/tables/continual.csv")
    assert set(table.step) == {1, 2} and table.held_in_normalized.notna().all()
    png = workdir / "results/plots/continual.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".pdf").exists()


def test_map_front(run):
    workdir, _, _ = run
    front = pd.read_csv(workdir / "results/pareto/smoke/k2s0/map.csv")
    assert front[front.kind == "probe"].point.nunique() == 6 + 1  # full quadratic in 2 + extra
    selected = front[front.kind == "selected"]
    assert selected.point.nunique() == 3 and selected.measured.between(0, 1).all()
    assert front[front.kind == "front"].measured.isna().all()
    card = json.loads((workdir / "results/merged/smoke/map/k2s0/merge_card.json").read_text())
    best = selected[selected.point == 0].set_index("task")
    weights = [e["params"]["weight"] for e in card["experts"]]
    assert weights == pytest.approx([best.coefficient["last_letter"], best.coefficient["next_letter"]])
    assert card["models_scored"] == 7 + 3
    summary = pd.read_csv(workdir / "results/tables/map.csv")
    assert len(summary) == 1 and summary.best_measured.iloc[0] == pytest.approx(best.measured.mean(), abs=1e-4)
    assert "front_measured_spread" in (workdir / "results/tables/map.md").read_text()
    assert (workdir / "results/plots/map_front.png").stat().st_size > 10_000


def test_second_run_does_nothing(run):
    workdir, config_path, _ = run
    assert planned_jobs(workdir, config=config_path) == {}
