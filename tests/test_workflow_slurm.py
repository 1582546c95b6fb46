"""The smoke workflow through the SLURM executor on a real local cluster gives the same
scores as the same workflow run locally."""

import pandas as pd
import pytest

from slurm_fixtures import LOCAL_PROFILE, slurm_env  # noqa: F401
from workflow_helpers import snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_smoke_workflow_on_slurm_matches_local_run(slurm_env, smoke_run, tmp_path):  # noqa: F811
    proc = snakemake(tmp_path, "--workflow-profile", str(LOCAL_PROFILE), env=slurm_env)
    log = proc.stdout + proc.stderr
    assert "Submitted" in log or "SLURM" in log  # jobs really went through sbatch
    cols = ["model", "task", "split", "value", "n"]
    local = pd.read_csv(smoke_run / "results/tables/scores.csv")[cols]
    cluster = pd.read_csv(tmp_path / "results/tables/scores.csv")[cols]
    pd.testing.assert_frame_equal(local, cluster)
