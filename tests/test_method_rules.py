"""Adding merge methods as docs/adding-a-method.md says, both kinds, in a copy of the workflow.

The files of docs/adding-a-method.md are written into a copy of the repository exactly
as the page shows them; a slice of the smoke config (k=2, one
subset) then runs the toy methods, the built-in rule-method twin_merging and the plain
average through Snakemake, real training and lm-eval included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergescale.tasks.combos import expert_subsets
from workflow_helpers import REPO, SMOKE_CONFIG


def docs_files_and_config() -> tuple[dict[str, str], dict]:
    """{path: text} of every "File `path`:" block of the page, and its config block."""
    section = (REPO / "docs" / "adding-a-method.md").read_text()
    files = dict(re.findall(r"File `([^`]+)`:\n\n```\w*\n(.*?)```", section, flags=re.S))
    config = re.search(r"under `merge.methods`:\n\n```yaml\n(.*?)```", section, flags=re.S).group(1)
    return files, yaml.safe_load(config)


def run_snakemake(repo: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake on the copy's Snakefile in repo/../work (a working directory without
    config/config.yaml, which Snakemake would otherwise merge under --configfile)."""
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}  # the copy's package, toy method included
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "workflow" / "Snakefile"),
           "--directory", str(repo.parent / "work"), "--configfile", str(config), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def slice_config(methods: dict) -> dict:
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["merge"].update(ks=[2], subsets_per_k=1)
    config["merge"]["methods"] = {
        "average": {"method": "linear"},
        **methods,
        "twin_merging": {"rule": "twin_merging", "params": {"rank": 4, "router_steps": 200}},
    }
    return config


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    repo = tmp_path_factory.mktemp("methods") / "repo"
    (repo.parent / "work").mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "results", ".snakemake")
    for part in ("workflow", "src", "config"):
        shutil.copytree(REPO / part, repo / part, ignore=ignore)
    files, methods = docs_files_and_config()
    # a plain rule-method is one module plus one config line
    assert set(files) == {"src/mergescale/merge/methods/median.py", "src/mergescale/rule_methods/copy_first.py"}
    assert methods["copy_first"] == {"rule": "copy_first"}
    for path, text in files.items():
        (repo / path).write_text(text)
    config = repo / "config" / "slice.yaml"
    config.write_text(yaml.safe_dump(slice_config(methods), sort_keys=False))
    return repo, config


@pytest.fixture(scope="module")
def ran(copied):
    repo, config = copied
    run_snakemake(repo, config, "--cores", "2")
    return repo.parent / "work"


@pytest.mark.parametrize("entry", [{"method": "linear", "rule": "copy_first"}, {"params": {}}])
def test_config_entry_names_a_method_or_a_rule(entry):
    from mergescale.config import ConfigError, check_schema

    with pytest.raises(ConfigError, match=r"config key merge.methods.x: "):
        check_schema(slice_config({"x": entry}))


def test_config_naming_a_missing_rule_fails_before_any_job(copied, tmp_path):
    repo, _ = copied
    config = slice_config({"nope": {"rule": "no_such_rule"}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(AssertionError, match=r"merge.methods.nope.rule: no rule-method 'no_such_rule'"):
        run_snakemake(repo, path, "-n")


def test_engine_methods_and_rule_methods_are_merged_by_the_two_generic_rules(copied):
    repo, config = copied
    proc = run_snakemake(repo, config, "-n")
    jobs = re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+output: (\S+)", proc.stdout, flags=re.M)
    merged = {out.split("/")[3]: rule for rule, out in jobs if out.startswith("results/merged/")}
    assert merged == {"average": "merge", "median": "merge", "copy_first": "merge_rule_method",
                      "twin_merging": "merge_rule_method"}


@pytest.mark.slow
def test_toy_methods_rows_are_in_the_tables_with_plausible_scores(ran):
    scores = pd.read_csv(ran / "results/tables/scores.csv")
    smoke = yaml.safe_load(SMOKE_CONFIG.read_text())
    tasks = smoke["tasks"]["held_in"] + smoke["tasks"]["held_out"]
    merged = scores[scores.kind == "merged"]
    assert set(merged.method) == {"average", "median", "copy_first", "twin_merging"}
    for method, rows in merged.groupby("method"):
        assert sorted(rows.task) == sorted(tasks), method
        assert rows.value.between(0, 1).all() and (rows.n == smoke["data"]["sizes"]["test"]).all()
    by = merged.set_index(["method", "task"]).value
    # copy_first is the subset's first expert: the same weights, the same scores.
    combo = merged[merged.method == "copy_first"].combo.iloc[0]
    first = expert_subsets(smoke["tasks"]["held_in"], [2], 1, smoke["seed"])[combo][0]
    expert = scores[(scores.kind == "expert") & (scores.expert_task == first)].set_index("task").value
    for task in tasks:
        assert by[("copy_first", task)] == expert[task], task
    # The median of two task vectors is their mean: median merging is averaging.
    for task in tasks:
        assert abs(by[("median", task)] - by[("average", task)]) <= 0.05, task
    normalized = pd.read_csv(ran / "results/tables/normalized.csv")
    assert {"median", "copy_first", "twin_merging"} <= set(normalized.method)
    assert "| smoke | pretrained | copy_first | 2 |" in (ran / "results/tables/summary.md").read_text()


@pytest.mark.slow
def test_twin_merging_is_evaluated_from_its_model_spec(ran):
    merged = next((ran / "results/merged/smoke/twin_merging").iterdir())
    assert (merged / "model_spec.json").exists() and not (merged / "config.json").exists()
    record = json.loads((ran / f"results/evals/merged/smoke/twin_merging/{merged.name}/scores.json").read_text())
    card = record["model_card"]
    assert card["method"] == "twin_merging" and card["storage_bytes"]["exclusive"] > 0
    assert card["router_train_accuracy"] >= 0.9
    scores = pd.read_csv(ran / "results/tables/scores.csv")
    twin = scores[(scores.method == "twin_merging") & scores.trained_on]
    average = scores[(scores.method == "average") & scores.trained_on]
    # Routing each input to its task's exclusive part recovers expert skill averaging loses.
    assert twin.value.mean() >= average.value.mean()
    assert (ran / "results/benchmarks/merge_rule_method/twin_merging/smoke").is_dir()
    assert (ran / f"results/logs/merge_rule_method/twin_merging/smoke/{merged.name}.log").is_file()


def test_rule_method_output_is_atomic_and_carries_the_card(tmp_path):
    from mergescale.merge.card import rule_method_output

    what = dict(method="toy", description="d", paper="p", params={"a": 1}, base=None,
                experts=[tmp_path], seed=3, dtype="float32", device="cpu")
    with pytest.raises(RuntimeError, match="boom"):
        with rule_method_output(tmp_path / "failed", **what) as (out, card):
            (out / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob(".failed*"))
    with rule_method_output(tmp_path / "done", **what) as (out, card):
        card["storage_bytes"] = {"extra": 5}
    written = json.loads((tmp_path / "done" / "merge_card.json").read_text())
    assert written["params"] == {"a": 1} and written["experts"][0]["path"] == str(tmp_path.resolve())
    assert written["wall_time_s"] >= 0 and written["peak_rss_bytes"] > 0 and written["storage_bytes"]
    assert "Storage: extra 5 B" in (tmp_path / "done" / "README.md").read_text()


@pytest.mark.parametrize("spec, message", [
    ('{"model": "no-such-model"}', r"model 'no-such-model' is not registered with lm-eval"),
    ('{"model": "mergescale-twin", "extra": 1}', r"unknown key\(s\) \['extra'\]"),
    ('{"model_args": {}}', r"string key 'model'"),
    ("{not json", r"not valid JSON"),
])
def test_bad_model_spec_names_the_file(tmp_path, spec, message):
    from mergescale.evaluate.spec_models import load_spec_model

    (tmp_path / "model_spec.json").write_text(spec)
    with pytest.raises(ValueError, match=rf"model_spec.json: .*{message}"):
        load_spec_model(tmp_path)
