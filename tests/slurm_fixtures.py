"""Pytest fixture for tests that need a real SLURM cluster.

``slurm_env`` starts a single-node SLURM cluster on this machine with
``scripts/local_slurm.sh start`` (once per test session), yields the
environment to run SLURM commands and Snakemake against it (``SLURM_CONF``
set), and stops the cluster at the end of the session, whatever happened.

Use it from a test module::

    from slurm_fixtures import slurm_env  # noqa: F401  (pytest fixture)

    @pytest.mark.slurm
    def test_x(slurm_env):
        subprocess.run(["sbatch", ...], env=slurm_env, check=True)

Several modules may import it: the cluster is started once and stopped after
the last user is done.

Starting the cluster needs root. A test using the fixture is skipped only when
not running as root and no local cluster is already up; under CI (``CI=true``)
it fails instead, so that a CI run can never pass without running it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "workflow" / "profiles" / "slurm-local"

# First start on a fresh machine installs slurm-wlm and munge with apt-get.
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 120

_state: dict = {"users": 0, "env": None, "owner": False}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def base_env() -> dict[str, str]:
    """os.environ plus this interpreter's bin dir and /usr/sbin on PATH."""
    env = dict(os.environ)
    path = [str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"]
    env["PATH"] = os.pathsep.join(p for p in path if p)
    return env


def _run_script(action: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), action],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cluster_env(env: dict[str, str]) -> dict[str, str]:
    state_dir = env.get("LOCAL_SLURM_DIR", "/tmp/mergescale-slurm")
    env = dict(env)
    env["LOCAL_SLURM_DIR"] = state_dir
    env["SLURM_CONF"] = str(Path(state_dir) / "slurm.conf")
    return env


def _start() -> tuple[dict[str, str], bool]:
    """Return (env, owner): owner is True when this process started the cluster."""
    env = base_env()
    if os.geteuid() != 0:
        status = _run_script("status", env, 60)
        if status.returncode == 0:
            print(f"using the local SLURM cluster that is already running:\n{status.stdout}")
            return _cluster_env(env), False
        reason = (
            "needs a local SLURM cluster: `scripts/local_slurm.sh start` must run as root "
            "and none is running (start one with `sudo scripts/local_slurm.sh start`)"
        )
        if in_ci():
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)

    try:
        proc = _run_script("start", env, START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        _run_script("stop", env, STOP_TIMEOUT_S)
        pytest.fail(f"scripts/local_slurm.sh start timed out after {exc.timeout}s", pytrace=False)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/local_slurm.sh start failed (exit {proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )
    return _cluster_env(env), True


def _stop(env: dict[str, str]) -> None:
    proc = _run_script("stop", env, STOP_TIMEOUT_S)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/local_slurm.sh stop failed (exit {proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def slurm_env():
    """Environment (a dict for ``subprocess.run(env=...)``) of a running local SLURM cluster."""
    if _state["users"] == 0:
        _state["env"], _state["owner"] = _start()
    _state["users"] += 1
    try:
        yield dict(_state["env"])
    finally:
        _state["users"] -= 1
        if _state["users"] == 0 and _state["owner"]:
            _state["owner"] = False
            _stop(_state["env"])
