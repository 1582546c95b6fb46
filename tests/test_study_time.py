"""benchmarks/study_time.py: per-job costs read from a run's benchmark files, job logs
and training cards, and the arithmetic of the prediction, on a synthetic run whose files
have the formats the workflow writes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergescale.job import TIMING_PREFIX

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
spec = importlib.util.spec_from_file_location("study_time", REPO / "benchmarks" / "study_time.py")
study_time = sys.modules["study_time"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_time)

BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_job(results, rule, path, *, client_cpu, worker_cpu=None, start=0.0, work=(1.0, 3.0),
              benchmark=True):
    """A finished job as the workflow leaves it: its log ending with the timing line and
    (for rules with `benchmark:`) Snakemake's benchmark file."""
    rel = f"{rule}/{path}" if path else rule
    log = results / "logs" / f"{rel}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    record = {"process_start": start, "work_start": start + work[0], "work_end": start + work[1]}
    if worker_cpu is not None:
        record["worker_cpu_s"] = worker_cpu
    log.write_text("step 1\n" + TIMING_PREFIX + json.dumps(record) + "\n")
    if benchmark:
        tsv = results / "benchmarks" / f"{rel}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text(BENCH_HEADER + f"{work[1]:.2f}\t0:00:03\t200\t700\t150\t160\t0\t0.5\t3.0\t{client_cpu}\n")


def write_model(directory, hidden):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(hidden, hidden), "b": torch.zeros(hidden)}, str(directory / "model.safetensors"))


def write_card(directory, steps, train_seconds):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "training_card.json").write_text(json.dumps(
        {"config": {"steps": steps, "batch_size": 64}, "train_seconds": train_seconds}))


@pytest.fixture
def run_dir(tmp_path):
    results = tmp_path / "results"
    write_model(results / "bases" / "small", 10)    # 110 parameters
    write_model(results / "bases" / "large", 100)   # 10,100 parameters
    # a pretraining job: 4 s of wall, 3 of them in the loop of 100 steps; CPU 0.5 + 7.5
    write_job(results, "pretrain_base", "large", client_cpu=0.5, worker_cpu=7.5, work=(0.5, 4.0))
    write_card(results / "bases" / "large", steps=100, train_seconds=3.0)
    # merges at k = 2 and k = 8 (CPU 1 + 2 and 1 + 5): a line over k
    write_job(results, "merge", "large/ties/k2s0", client_cpu=1.0, worker_cpu=2.0)
    write_job(results, "merge", "large/ties/k8s0", client_cpu=1.0, worker_cpu=5.0)
    write_job(results, "merge", "small/ties/k2s0", client_cpu=1.0, worker_cpu=0.5)
    # evaluation batches of 10 and 4 models
    write_job(results, "evaluate_batch", "experts/large", client_cpu=1.0, worker_cpu=19.0)
    write_job(results, "evaluate_batch", "merged/large/k2s0", client_cpu=1.0, worker_cpu=7.0)
    for group, n in (("experts/large", 10), ("merged/large/k2s0", 4)):
        batch = results / "evals" / "batches" / f"{group}.json"
        batch.parent.mkdir(parents=True, exist_ok=True)
        batch.write_text(json.dumps({"models": {f"m{i}": {} for i in range(n)}}))
    # a light local rule: no benchmark file; its client's CPU is the median client's (1.0)
    write_job(results, "aggregate_scores", "", client_cpu=None, worker_cpu=2.0, benchmark=False)
    return tmp_path


def test_measured_jobs_read_cpu_sizes_and_units(run_dir):
    jobs = {(j.rule, j.path): j for j in study_time.measured_jobs(run_dir)}
    pretrain = jobs[("pretrain_base", "large")]
    assert pretrain.cpu == pytest.approx(8.0)
    assert pretrain.parameters == 10_100 and pretrain.units == 100
    # the loop took 3 of the job's 4 s: 6 CPU s in 100 steps, 2 CPU s fixed
    assert pretrain.info == pytest.approx({"fixed": 2.0, "per_step": 0.06})
    merge = jobs[("merge", "large/ties/k8s0")]
    assert (merge.cpu, merge.k, merge.method, merge.units) == (6.0, 8, "ties", 8)
    assert jobs[("evaluate_batch", "experts/large")].units == 10
    assert jobs[("aggregate_scores", "")].cpu == pytest.approx(3.0)
    assert merge.startup == pytest.approx(1 / 3)


DRY_RUN = """
Job stats:
job      count
-------  -------
merge         2

[Thu Dec  3 16:57:11 2026]
rule pretrain_base:
    input: results/data/a/train.jsonl
    output: results/bases/large
    log: results/logs/pretrain_base/large.log
    jobid: 3
    reason: Missing output files: results/bases/large
    wildcards: base=large
    resources: tmpdir=/tmp

[Thu Dec  3 16:57:11 2026]
rule merge:
    input: results/bases/large, results/experts/large/a, results/experts/large/b
    output: results/merged/large/ties/k4s1
    log: results/logs/merge/large/ties/k4s1.log
    jobid: 7
    wildcards: base=large, method=ties, combo=k4s1
    resources: tmpdir=/tmp

[Thu Dec  3 16:57:11 2026]
rule evaluate_batch:
    input: results/merged/large/ties/k4s1, results/merged/large/ties2/k4s1, results/tasks/a_test.yaml
    output: results/evals/batches/merged/large/k4s1.json
    log: results/logs/evaluate_batch/merged/large/k4s1.log
    jobid: 8
    wildcards: group=merged/large/k4s1
    resources: tmpdir=/tmp

[Thu Dec  3 16:57:11 2026]
localrule aggregate_scores:
    input: results/evals/a/scores.json
    output: results/tables/scores.csv
    log: results/logs/aggregate_scores.log
    jobid: 9
    resources: tmpdir=/tmp

[Thu Dec  3 16:57:11 2026]
rule unbatch_scores:
    input: results/evals/batches/merged/large/k4s1.json
    output: results/evals/merged/large/ties/k4s1/scores.json
    jobid: 10
    wildcards: model=merged/large/ties/k4s1
    resources: tmpdir=/tmp
"""

CONFIG = {
    "bases": {"large": {"source": "pretrain", "shape": {"hidden_size": 64, "num_hidden_layers": 2,
                                                          "num_attention_heads": 4, "intermediate_size": 256},
                        "pretrain": {"steps": 300, "batch_size": 64, "lr": 1e-3, "seed": 0}}},
    "tasks": {"held_in": ["a", "b", "c", "d"], "held_out": []},
    "finetune": {"expert": {"steps": 150}},
}


def test_the_dry_run_listing_becomes_jobs_with_their_units():
    listing = study_time.parse_dry_run(DRY_RUN)
    assert [j["rule"] for j in listing] == ["pretrain_base", "merge", "evaluate_batch", "aggregate_scores", "unbatch_scores"]
    jobs = study_time.planned_jobs(CONFIG, listing)
    assert [(j.rule, j.path, j.k, j.method, j.units) for j in jobs] == [
        ("pretrain_base", "large", None, None, 300),
        ("merge", "large/ties/k4s1", 4, "ties", 4),
        ("evaluate_batch", "merged/large/k4s1", 4, None, 2),
        ("aggregate_scores", "", None, None, None),
        ("unbatch_scores", "merged/large/ties/k4s1", 4, "ties", 4),
    ]


def test_the_prediction_adds_up(run_dir):
    measured = study_time.measured_jobs(run_dir)
    planned = study_time.planned_jobs(CONFIG, study_time.parse_dry_run(DRY_RUN))
    # the config's base has 0.1M parameters: none of the measured sizes, so every cost
    # comes from another size; make the measured "large" base its size instead
    for job in planned:
        job.parameters = 10_100
    pred = study_time.predict(planned, measured, {"unbatch_scores": 0.5}, scheduler_cpu_per_job=0.2,
                              dag_cpu=10.0)
    rows = pred.per_rule
    assert rows["pretrain_base"]["cpu"] == pytest.approx(2.0 + 0.06 * 300)
    # merge at k = 4 on the line through (2, 3) and (8, 6): 4; the small base's merge is
    # another size and left out
    assert rows["merge"]["cpu"] == pytest.approx(4.0)
    # evaluation batch of 2 models on the line through (4, 8) and (10, 20): 4
    assert rows["evaluate_batch"]["cpu"] == pytest.approx(4.0)
    assert rows["aggregate_scores"]["cpu"] == pytest.approx(3.0)
    assert rows["unbatch_scores"]["cpu"] == pytest.approx(0.5)
    assert pred.job_cpu == pytest.approx(20.0 + 4 + 4 + 3 + 0.5)
    assert pred.scheduler_cpu == pytest.approx(5 * 0.2)
    # DAG + worker + serial tail (aggregate_scores) + the rest over 2 cores
    assert pred.wall(2) == pytest.approx(10.0 + study_time.WORKER_START_CPU + 3.0 + (28.5 + 1.0) / 2)


def test_a_size_not_measured_takes_another_size_and_says_so(run_dir):
    measured = study_time.measured_jobs(run_dir)
    job = study_time.Job("merge", "huge/ties/k2s0", parameters=5_000_000, k=2, method="ties", units=2)
    cpu, how = study_time.job_cost(job, measured, {})
    assert how == "~" and cpu == pytest.approx((3.0 + 1.5) / 2)  # k = 2 of both measured sizes
    cpu, how = study_time.job_cost(study_time.Job("tune", "x"), measured, {})
    assert (cpu, how) == (None, "none")


def test_check_compares_a_runs_jobs_with_their_prediction(run_dir, capsys):
    """A run predicted from itself: every rule's ratio is what the cost model keeps."""
    measured = study_time.measured_jobs(run_dir)
    study_time.check(run_dir, measured, {})
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert rows["merge"][0] == "3"
    # merges: the line through both sizes' points predicts 2.25 and 6.0 at k = 2 and 8
    # from size-matched pools (large: exact); small's one job is its own mean
    assert float(rows["merge"][1]) == pytest.approx(3.0 + 6.0 + 1.5)
    assert float(rows["pretrain_base"][3]) == pytest.approx(1.0)
