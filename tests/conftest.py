import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules

from workflow_helpers import snakemake  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole DAG on config/smoke.yaml, run locally once per test session.

    MERGESCALE_SMOKE_DIR reuses a run directory across sessions (Snakemake then runs only
    what is missing or outdated there): handy while developing, unset in CI."""
    reuse = os.environ.get("MERGESCALE_SMOKE_DIR")
    workdir = Path(reuse) if reuse else tmp_path_factory.mktemp("smoke")
    snakemake(workdir, "--cores", "2")
    return workdir
