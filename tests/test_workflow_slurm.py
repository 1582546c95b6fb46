"""The smoke workflow through the SLURM executor on a real local cluster gives the same
scores as the same workflow run locally.

The cluster run uses a slice of the smoke grid (one method, k=2) to keep the SLURM
status polling short; every model it evaluates must score exactly as in the local run.
"""

import pandas as pd
import pytest
import yaml

from slurm_fixtures import LOCAL_PROFILE, slurm_env  # noqa: F401
from workflow_helpers import SMOKE_CONFIG, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_smoke_workflow_on_slurm_matches_local_run(slurm_env, smoke_run, tmp_path):  # noqa: F811
    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["merge"]["methods"] = {"ties": config["merge"]["methods"]["ties"]}
    config["merge"]["ks"] = [2]
    config_path = tmp_path / "slurm-smoke.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    workdir = tmp_path / "run"
    proc = snakemake(workdir, "--workflow-profile", str(LOCAL_PROFILE), config=config_path, env=slurm_env)
    log = proc.stdout + proc.stderr
    assert "submitted with SLURM jobid" in log  # jobs really went through sbatch
    cols = ["model", "task", "split", "value", "n"]
    cluster = pd.read_csv(workdir / "results/tables/scores.csv")[cols]
    local = pd.read_csv(smoke_run / "results/tables/scores.csv")[cols]
    assert set(cluster.model) == {"bases/smoke", "experts/smoke/last_letter", "experts/smoke/next_letter",
                                  "experts/smoke/word_length", "multitask/smoke/k2s0", "merged/smoke/ties/k2s0",
                                  "ensembles/smoke/k2s0"}
    expected = local[local.model.isin(set(cluster.model))].reset_index(drop=True)
    pd.testing.assert_frame_equal(cluster.reset_index(drop=True), expected)
