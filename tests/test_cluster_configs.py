"""The cluster tier's configs (MergeBench, the scale study): validated and planned with
`snakemake -n` (no network needed), job counts checked against counts derived here from
the config; config errors for model and task sources; temporary merged checkpoints."""

import copy
import importlib.util
import json
import math
import resource
import time

import pytest
import yaml

from mergescale.config import ConfigError, check_schema, check_semantics, load_config
from test_hub import tiny_checkpoint
from workflow_helpers import REPO, SMOKE_CONFIG, planned_job_resources, planned_jobs, snakemake

CONFIGS = {"mergebench": REPO / "config" / "mergebench.yaml", "scale": REPO / "config" / "scale.yaml"}


def expected_jobs(config: dict) -> dict[str, int]:
    """Jobs a fresh run plans, counted from the config alone."""
    held_in, held_out = config["tasks"]["held_in"], config["tasks"]["held_out"]
    lm_eval = config["tasks"].get("lm_eval", {})
    bases = config["bases"]
    n_combos = sum(min(config["merge"].get("subsets_per_k", 1), math.comb(len(held_in), k))
                   for k in config["merge"]["ks"])
    n_methods = len(config["merge"]["methods"])
    fetched_experts = sum(1 for b in bases.values() if b.get("experts"))
    trained_experts = len(bases) - fetched_experts
    multitask = "multitask" in config.get("finetune", {})
    # one multitask model per base on all held-in tasks, or one per subset (per_subset)
    multitask_models = (n_combos if config["finetune"]["multitask"].get("per_subset") else 1
                        ) if multitask else 0
    ensemble = config.get("evaluate", {}).get("ensemble", True)
    from mergescale.merge import get_method

    registered = [get_method(m["method"]) for m in config["merge"]["methods"].values() if "method" in m]
    tuned = any(m.get("tune") for m in config["merge"]["methods"].values())
    validation = tuned or any(m.needs_data or m.needs_stats_rule for m in registered)
    counts = {
        "download_base": sum(1 for b in bases.values() if b["source"] in ("hub", "local")),
        "download_expert": fetched_experts * len(held_in),
        "finetune_expert": trained_experts * len(held_in),
        "finetune_multitask": len(bases) * multitask_models,
        "export_lm_eval_train": sum(1 for t in held_in if "train" in lm_eval.get(t, {}))
        if (trained_experts or multitask) else 0,
        "export_lm_eval_validation": len(held_in) if validation else 0,
        "render_lm_eval_validation": len(held_in) if tuned else 0,
        "compute_stats": len(bases) * len(held_in) if any(m.needs_stats_rule for m in registered) else 0,
        "merge": len(bases) * n_methods * n_combos,
        "tune": len(bases) * n_combos * sum(bool(m.get("tune")) for m in config["merge"]["methods"].values()),
        "build_ensemble": len(bases) * n_combos * int(ensemble),
        "evaluate": len(bases) * (1 + len(held_in) + multitask_models + (n_methods + int(ensemble)) * n_combos),
        "aggregate_scores": 1, "write_findings": 1, "plot_figures": 1, "all": 1,
        "compute_task_vector_stats": len(bases), "write_task_vector_table": 1,
        "write_tuning_table": int(any(m.get("tune") for m in config["merge"]["methods"].values())),
    }
    return {rule: n for rule, n in counts.items() if n}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cluster_config_validates_and_plans(name, tmp_path):
    config = load_config(CONFIGS[name])
    assert all(spec["source"] == "hub" for spec in config["bases"].values())
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    jobs = planned_jobs(tmp_path, config=CONFIGS[name])
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"\n{name}: {sum(jobs.values())} jobs planned in {seconds:.1f} s ({cpu_s:.1f} s CPU): {jobs}")
    assert jobs == expected_jobs(config)
    assert seconds < 60


# The largest base of each cluster config, from its published config.json: parameters
# and the largest tensor (the embedding), independent of mergescale.resources.
LARGEST = {"mergebench": ("gemma-2-9b", 9.24e9, 256000 * 3584),
           "scale": ("qwen2.5-14b", 14.77e9, 152064 * 5120)}
# Rules that run on the submit host (localrules) and hold no model.
LIGHT = {"download_base", "download_expert", "export_lm_eval_train", "export_lm_eval_validation",
         "make_task_data", "render_task",
         "render_lm_eval_validation", "build_ensemble", "unbatch_scores", "aggregate_scores", "write_findings",
         "plot_figures", "write_task_vector_table", "write_tuning_table", "all"}


def _held_bytes(rule: str, work, k: int, params: float, embedding: int) -> float:
    """What a job must hold at least (bf16 checkpoints): the rule used by the test."""
    if work.kind == "train":
        return params * 4  # the float32 weights
    if work.kind == "stats":
        return params * 4  # float32 weights (and gradients)
    if work.kind == "stream":
        return (k + 1) * embedding * 2  # one tensor of the base and of each expert
    if work.kind == "convert":
        return 2 * params * 2
    if work.kind == "fit" and rule != "tune":
        return (k + 1) * params * 2  # the base and k experts
    return params * 2  # one model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cluster_jobs_are_sized_and_placed(name, tmp_path):
    """Planned with the SLURM profile: forward passes ask for a GPU and nothing else does;
    memory covers what each job holds for the largest base; no tiny-tier constant left."""
    from mergescale.merge import get_method
    from mergescale.resources import WORK, merge_work

    config = load_config(CONFIGS[name])
    methods = config["merge"]["methods"]
    jobs = planned_job_resources(tmp_path, "--profile", "workflow/profiles/slurm", config=CONFIGS[name])
    largest, params, embedding = LARGEST[name]
    seen, by_size = set(), {}
    for job in jobs:
        rule, wc, res = job["rule"], job["wildcards"], job["resources"]
        if rule not in WORK:
            assert rule in LIGHT, f"{rule}: a job the workflow does not size"
            continue
        work = merge_work(get_method(methods[wc["method"]]["method"])) if rule == "merge" else WORK[rule]
        assert res["gpu"] == int(work.forward), (rule, wc, res)
        assert res["mem_mb"] not in (2000, 3000, 4000) and res["runtime"] > 15, (rule, wc, res)
        by_size.setdefault(rule, set()).add((res["mem_mb"], res["runtime"]))
        base = wc.get("base") or next(iter(v.split("/")[1] for v in wc.values()), None)
        if base == largest:
            combo = wc.get("combo") or ""
            k = int(combo[1:combo.index("s")]) if combo else 1
            assert res["mem_mb"] * 2**20 >= _held_bytes(rule, work, k, params, embedding), (rule, wc, res)
            seen.add(rule)
    heavy = {job["rule"] for job in jobs if job["rule"] in WORK}
    assert seen == heavy  # every sized rule has jobs on the largest base
    if name == "scale":  # five sizes: no rule keeps one figure for all of them
        assert all(len(figures) > 1 for figures in by_size.values()), by_size
    print(f"\n{name}: {len(jobs)} jobs; sized rules on {largest}: {sorted(seen)}")


def test_scale_grid_is_the_papers():
    config = load_config(CONFIGS["scale"])
    repos = {spec["repo"] for spec in config["bases"].values()}
    sizes = {r.removeprefix("Qwen/Qwen2.5-").removesuffix("-Instruct") for r in repos}
    assert len(sizes) >= 4 and len(repos) == 2 * len(sizes)  # base and instruct per size
    assert config["merge"]["ks"] == [2, 4, 6, 8]
    clusters = {config["tasks"]["lm_eval"][t]["cluster"] for t in config["tasks"]["held_in"]}
    held_out = {config["tasks"]["lm_eval"][t]["cluster"] for t in config["tasks"]["held_out"]}
    assert len(clusters) >= 4 and len(held_out) >= 4 and not clusters & held_out


def test_mergebench_has_five_experts_per_base():
    config = load_config(CONFIGS["mergebench"])
    assert len(config["bases"]) == 4
    for base, spec in config["bases"].items():
        assert sorted(spec["experts"]) == sorted(config["tasks"]["held_in"])
        assert all(e["repo"].startswith("MergeBench/") for e in spec["experts"].values())


def _smoke() -> dict:
    return yaml.safe_load(SMOKE_CONFIG.read_text())


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["bases"]["smoke"].update(source="hub"), "bases.smoke.shape: only for source pretrain"),
    (lambda c: c["bases"].update(smoke={"source": "hub"}), "bases.smoke.repo: required"),
    (lambda c: c["bases"].update(smoke={"source": "hub", "repo": "a/b"}), "bases.smoke.revision: required"),
    (lambda c: c["bases"].update(smoke={"source": "local"}), "bases.smoke.path: required"),
    (lambda c: c["bases"]["smoke"].update(experts={"last_letter": {"path": "/x"}}),
     "bases.smoke.experts: no expert for held-in task(s) next_letter, word_length"),
    (lambda c: c["bases"]["smoke"].update(experts={t: {"repo": "a/b"} for t in c["tasks"]["held_in"]}),
     "bases.smoke.experts.last_letter.revision"),
    (lambda c: c["tasks"].update(lm_eval={"first_letter": {"metrics": {"x": "acc,none"}}}),
     "tasks.lm_eval.first_letter: also a procedural task family"),
    (lambda c: (c["tasks"]["held_in"].append("math"),
                c["tasks"].update(lm_eval={"math": {"metrics": {"gsm8k": "exact_match,strict-match"}}})),
     "tasks.lm_eval.math.train: required"),
    (lambda c: c.pop("finetune"), "finetune.expert: required"),
])
def test_source_errors_name_the_key(edit, key):
    config = _smoke()
    edit(config)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        check_schema(config)
        check_semantics(config)


def test_lm_eval_metric_must_name_a_filter():
    config = copy.deepcopy(_smoke())
    config["tasks"]["lm_eval"] = {"math": {"metrics": {"gsm8k": "exact_match"}}}
    with pytest.raises(ConfigError, match=r"tasks\.lm_eval\.math\.metrics\.gsm8k"):
        check_schema(config)


@pytest.mark.slow
def test_temporary_merged_checkpoints_are_deleted_once_evaluated(tmp_path):
    """A real slice of the smoke DAG with merge.temporary: the merged checkpoint is gone
    after its evaluation; its scores (with the merge card) stay."""
    config = _smoke()
    config["data"]["sizes"] = {"train": 200, "validation": 10, "test": 10}
    config["bases"]["smoke"]["pretrain"]["steps"] = 5
    config["finetune"]["expert"]["steps"] = 5
    config["merge"]["temporary"] = True
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    target = "results/evals/merged/smoke/average/k2s0/scores.json"
    start = time.perf_counter()
    snakemake(work, "--cores", "2", target, config=path, timeout=900)
    print(f"\ntemporary slice ran in {time.perf_counter() - start:.0f} s")
    scores = json.loads((work / target).read_text())
    assert scores["model_card"]["method"] == "linear"
    assert not (work / "results/merged/smoke/average/k2s0").exists()
    assert (work / "results/experts/smoke").is_dir()  # only merged checkpoints are temporary


@pytest.mark.slow
def test_fetched_base_and_experts_run_through_the_dag(tmp_path):
    """A base and its experts from local directories (download_base, download_expert),
    no fine-tuning and no multitask model: merged, evaluated and aggregated."""
    import pandas as pd

    config = _smoke()
    held_in = config["tasks"]["held_in"]
    models = tmp_path / "models"
    experts = {t: {"path": str(tiny_checkpoint(models / t, seed=i + 1))} for i, t in enumerate(held_in)}
    config["bases"] = {"fetched": {"source": "local", "path": str(tiny_checkpoint(models / "base")),
                                   "experts": experts}}
    del config["finetune"]
    config["data"]["sizes"] = {"train": 50, "validation": 10, "test": 10}
    config["merge"].update(methods={"average": {"method": "linear"}}, ks=[2])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    assert planned_jobs(work, config=path) == {
        "make_task_data": 4, "render_task": 4, "download_base": 1, "download_expert": 3,
        "merge": 1, "build_ensemble": 1, "evaluate": 2, "evaluate_batch": 1, "unbatch_scores": 4,
        "compute_task_vector_stats": 1, "write_task_vector_table": 1,
        "aggregate_scores": 1, "write_findings": 1, "plot_figures": 1, "all": 1}
    snakemake(work, "--cores", "2", config=path, timeout=1200)
    scores = pd.read_csv(work / "results/tables/scores.csv")
    assert sorted(scores.kind.unique()) == ["base", "ensemble", "expert", "merged"]
    assert len(scores) == 6 * len(held_in + config["tasks"]["held_out"])
    card = json.loads((work / "results/experts/fetched/next_letter/source.json").read_text())
    assert card["source"] == "local" and card["path"] == experts["next_letter"]["path"]
    assert planned_jobs(work, config=path) == {}


def test_tuning_fits_and_rule_methods_plan_on_public_tasks(tmp_path):
    """Validation rows of public lm-eval tasks: tuning, Twin-Merging, MAP and the
    data-aware methods plan on the MergeBench config (no MissingInputException)."""
    config = yaml.safe_load(CONFIGS["mergebench"].read_text())
    config["merge"]["methods"] = {
        "task_arithmetic": {"method": "task_arithmetic", "tune": True},
        "twin": {"rule": "twin_merging"},
        "map": {"rule": "map"},
        "adamerging": {"method": "adamerging"},
        "greedy_soup": {"method": "greedy_soup"},
        "regmean_plus_plus": {"method": "regmean_plus_plus"},
    }
    config["bases"] = {"gemma-2-2b": config["bases"]["gemma-2-2b"]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(tmp_path / "work", config=path)
    held_in = len(config["tasks"]["held_in"])
    assert jobs["export_lm_eval_validation"] == held_in
    assert jobs["render_lm_eval_validation"] == held_in  # tuning and MAP score on them
    assert jobs["tune"] == 1 and jobs["merge_rule_method"] == 1 and jobs["merge_map"] == 1 and jobs["merge"] == 4


def test_a_held_in_task_without_validation_rows_names_the_key():
    config = yaml.safe_load(CONFIGS["mergebench"].read_text())
    del config["tasks"]["lm_eval"]["coding"]["validation"]
    with pytest.raises(ConfigError, match=r"tasks\.lm_eval\.coding\.validation: required"):
        check_schema(config)
        check_semantics(config)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_a_missing_backend_stops_the_run_before_any_job(tmp_path):
    """evaluate.backend: vllm without vllm: the run fails at its start, naming the key,
    before the downloads (a dry run only plans)."""
    proc = snakemake(tmp_path, "--cores", "1", config=CONFIGS["mergebench"], check=False, timeout=300)
    assert proc.returncode != 0 and "config key evaluate.backend" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
