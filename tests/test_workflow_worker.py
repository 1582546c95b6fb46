"""End-to-end: the smoke workflow run by the job worker (the default) gives the outputs of
jobs run in their own processes (MERGESCALE_WORKER=0): the same weights bit for bit, the
same scores and cards except what measures the run itself (times, peak RSS, dates).

The comparison run covers part of the DAG (the tuned method's k=2 evaluation: data,
pretraining, two experts, tuning, the k=2 merges, a batched evaluation) to stay short.
"""

import json
import os
import re

import pytest

from mergescale import worker
from mergescale.job import read_timing
from workflow_helpers import snakemake

pytestmark = pytest.mark.slow
TARGET = "results/evals/merged/smoke/task_arithmetic/k2s0/scores.json"
# What measures the run, not the result: differs between any two runs.
RUN_MEASURES = {"created_utc", "peak_rss_bytes", "wall_time_s", "seconds", "train_seconds"}


def _comparable_json(path, run_dir):
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in RUN_MEASURES}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(json.loads(path.read_text().replace(str(run_dir), "RUN")))


def test_the_smoke_run_used_the_worker(smoke_run):
    logs = list((smoke_run / worker.WORKER_DIR).glob("*.log"))
    assert logs and all(re.search(r"worker \d+ listening", p.read_text()) for p in logs)
    timing = read_timing(smoke_run / "results/logs/merge/smoke/ties/k2s0.log")
    assert timing["worker_cpu_s"] > 0  # the merge ran in a worker's child


def test_jobs_in_their_own_processes_give_the_same_outputs(smoke_run, tmp_path):
    plain = tmp_path / "plain"
    snakemake(plain, "--cores", "2", TARGET, env={**os.environ, worker.ENV_SWITCH: "0"})
    assert not (plain / worker.WORKER_DIR).exists()
    compared = {"safetensors": 0, "json": 0}
    for path in sorted((plain / "results").rglob("*")):
        rel = path.relative_to(plain)
        if not path.is_file() or rel.parts[1] in ("logs", "benchmarks"):
            continue
        other = smoke_run / rel
        if path.suffix == ".safetensors":
            assert path.read_bytes() == other.read_bytes(), rel
            compared["safetensors"] += 1
        elif path.suffix == ".json":
            assert _comparable_json(path, plain) == _comparable_json(other, smoke_run), rel
            compared["json"] += 1
        elif path.suffix in (".jsonl", ".yaml"):
            assert path.read_text().replace(str(plain), "RUN") == \
                other.read_text().replace(str(smoke_run), "RUN"), rel
    # base, 2 experts, 4 merges (+ tuning candidates are not kept): at least 7 checkpoints
    assert compared["safetensors"] >= 7 and compared["json"] >= 10, compared
