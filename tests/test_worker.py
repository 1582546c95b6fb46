"""The job worker (mergescale.worker): real servers, real forks, real signals.

Each script below starts the way the workflow's scripts do (``delegate(snakemake)``
first) and is run as its own Python process, as Snakemake runs a job. One server is
shared by the tests of a run directory (its imports take seconds); the run directory's
servers are stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergescale import worker

REPO = Path(__file__).resolve().parents[1]
PREAMBLE = ("import json, os, sys\n"
            "class Job: config = {}\n"
            "snakemake = Job()\n"
            "from mergescale.worker import delegate; delegate(snakemake)\n")


def job_env(**extra) -> dict:
    """A job's environment; its server imports torch only (the whole PRELOAD takes
    seconds), except in the first test, whose server imports what the workflow's do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop(worker.ENV_SWITCH, None)
    env.update({"PYTHONPATH": str(REPO / "src"), worker.ENV_IDLE: "60",
                worker.ENV_PRELOAD: "torch", **extra})
    return env


def write_job(run_dir: Path, name: str, body: str) -> Path:
    path = run_dir / name
    path.write_text(PREAMBLE + body)
    return path


def run_job(run_dir: Path, script: Path, *args: str, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=run_dir, env=env or job_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def started_servers(run_dir: Path) -> int:
    logs = (run_dir / worker.WORKER_DIR).glob("*.log")
    return sum(len(re.findall(r"worker \d+ listening", p.read_text())) for p in logs)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("worker-run")
    yield path
    worker.stop(path)


SAME_OUTPUT = """
import torch
from mergescale import worker
unseeded = torch.rand(2).tolist() if sys.argv[3] == "u" else None
torch.manual_seed(int(sys.argv[2]))
out = {"seeded": torch.randn(4).tolist(), "unseeded": unseeded,
       "cwd": os.getcwd(), "argv": sys.argv[1:], "env": os.environ.get("JOB_VALUE"),
       "stdin": sys.stdin.read(), "worker_child": worker.job_request is not None,
       "file": __file__.endswith("same_output.py")}
sys.stdout.write(json.dumps(out))
open(sys.argv[1], "w").write(json.dumps(out["seeded"]))
"""


def test_a_delegated_job_gives_the_output_of_a_job_run_in_its_own_process(run_dir):
    script = write_job(run_dir, "same_output.py", SAME_OUTPUT)
    results = {}
    full = job_env(JOB_VALUE="x")
    del full[worker.ENV_PRELOAD]
    for mode, env in (("worker", full), ("own process", {**full, worker.ENV_SWITCH: "0"})):
        proc = run_job(run_dir, script, f"out-{mode}.json", "7", "-", env=env, input="from stdin")
        assert proc.returncode == 0, proc.stderr
        results[mode] = json.loads(proc.stdout)
    assert results["worker"].pop("worker_child") and not results["own process"].pop("worker_child")
    assert results["worker"]["argv"][0] == "out-worker.json"
    results["worker"]["argv"][0] = "out-own process.json"
    assert results["worker"] == results["own process"]
    assert results["worker"]["stdin"] == "from stdin" and results["worker"]["env"] == "x"
    assert (run_dir / "out-worker.json").read_text() == (run_dir / "out-own process.json").read_text()
    assert started_servers(run_dir) == 1


def test_unseeded_generators_differ_between_jobs_as_between_processes(run_dir):
    """Each child reseeds from the OS: no two jobs share the server's random state."""
    script = write_job(run_dir, "same_output.py", SAME_OUTPUT)
    draws = [json.loads(run_job(run_dir, script, "o.json", "0", "u").stdout)["unseeded"] for _ in range(2)]
    assert draws[0] != draws[1]


def test_a_failing_job_returns_its_exit_status_and_traceback(run_dir):
    script = write_job(run_dir, "fail.py", "print('partial', flush=True)\n"
                                           "if sys.argv[1] == 'exit': sys.exit(3)\n"
                                           "raise ValueError('tensor model.embed has NaN')\n")
    proc = run_job(run_dir, script, "raise")
    assert proc.returncode == 1
    assert proc.stdout == "partial\n"
    assert proc.stderr.splitlines()[-1] == "ValueError: tensor model.embed has NaN"
    assert "fail.py" in proc.stderr and "runpy" not in proc.stderr
    assert run_job(run_dir, script, "exit").returncode == 3


def _wait_for(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_client_kills_the_job(run_dir, signum):
    pid_file = run_dir / f"child-{signum}.pid"
    script = write_job(run_dir, "sleep.py", "import subprocess, time\n"
                                            "grandchild = subprocess.Popen(['sleep', '300'])\n"
                                            "open(sys.argv[1], 'w').write(f'{os.getpid()} {grandchild.pid}')\n"
                                            "time.sleep(300)\n")
    client = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=run_dir, env=job_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child, grandchild = map(int, _wait_for(pid_file).split())
    assert child != client.pid
    client.send_signal(signum)
    assert client.wait(timeout=30) == -signum  # as if the job had run in the client itself
    assert _gone(child) and _gone(grandchild)


def test_two_first_jobs_at_once_start_one_server(tmp_path):
    script = write_job(tmp_path, "hello.py", "from mergescale import worker\n"
                                             "print(os.getpid(), worker.job_request is not None)\n")
    try:
        clients = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=job_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(3)]
        outs = [c.communicate(timeout=300) for c in clients]
        assert [c.returncode for c in clients] == [0, 0, 0], outs
        assert all(out.split()[1] == "True" for out, _ in outs)
        assert started_servers(tmp_path) == 1
    finally:
        worker.stop(tmp_path)


def test_the_job_runs_in_its_own_process_when_the_worker_is_off(tmp_path):
    script = write_job(tmp_path, "where.py", "from mergescale import worker\n"
                                             "print(worker.job_request is not None)\n")
    for env in (job_env(**{worker.ENV_SWITCH: "0"}), job_env(SLURM_JOB_ID="42")):
        proc = run_job(tmp_path, script, env=env)
        assert proc.stdout == "False\n" and proc.stderr == ""
    assert not (tmp_path / worker.WORKER_DIR).exists()


def test_an_unreachable_worker_means_a_job_in_its_own_process_and_a_note(tmp_path):
    (tmp_path / ".snakemake").write_text("not a directory")  # the worker cannot start
    script = write_job(tmp_path, "where.py", "from mergescale import worker\n"
                                             "print(worker.job_request is not None)\n")
    proc = run_job(tmp_path, script)
    assert proc.returncode == 0 and proc.stdout == "False\n"
    assert proc.stderr.startswith("mergescale worker: ") and "own process" in proc.stderr


def test_the_workflow_scripts_delegate_first_and_their_imports_are_preloaded():
    for script in sorted((REPO / "workflow" / "scripts").glob("*.py")):
        lines = script.read_text().splitlines()
        assert lines[0].startswith("from mergescale.worker import delegate; delegate(snakemake)"), script
        for line in lines[1:]:
            m = re.match(r"from (mergescale[\w.]*) import|import (mergescale[\w.]*)", line)
            if m:
                module = m.group(1) or m.group(2)
                assert module in worker.PRELOAD, f"{script.name} imports {module}, not preloaded"


def test_the_client_imports_nothing_heavy():
    code = ("import sys; import mergescale.worker, mergescale.job; "
            "print([m for m in ('torch', 'numpy', 'pandas', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], env=job_env(), capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_changed_package_source_starts_a_fresh_server(tmp_path):
    """Code edited while a server lives must not run with the server's stale imports."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "mergescale", src / "mergescale",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run = tmp_path / "run"
    run.mkdir()
    env = job_env(PYTHONPATH=str(src), **{worker.ENV_PRELOAD: "mergescale.io_utils"})
    script = write_job(run, "answer.py", "from mergescale import io_utils, worker\n"
                                         "print(getattr(io_utils, 'ANSWER', None), worker.job_request is not None)\n")
    try:
        assert run_job(run, script, env=env).stdout == "None True\n"
        with open(src / "mergescale" / "io_utils.py", "a") as fh:
            fh.write("\nANSWER = 42\n")
        assert run_job(run, script, env=env).stdout == "42 True\n"
        assert started_servers(run) == 2
    finally:
        worker.stop(run)


def test_a_delegated_job_times_its_start_up_from_the_client_and_records_its_cpu(run_dir):
    """Start-up runs from the client's start (here: 0.3 s asleep before delegating); the
    child's CPU, which Snakemake's benchmark of the client cannot see, is in the log."""
    from mergescale.job import read_timing

    script = run_dir / "timed.py"
    script.write_text("import time; time.sleep(0.3)\n" + PREAMBLE +
                      "from mergescale.job import log_to\n"
                      "with log_to(sys.argv[1]):\n"
                      "    sum(i * i for i in range(2_000_000))\n")
    proc = run_job(run_dir, script, "timed.log")
    assert proc.returncode == 0, proc.stderr
    timing = read_timing(run_dir / "timed.log")
    assert 0.3 <= timing["work_start"] - timing["process_start"] < 60
    assert timing["worker_cpu_s"] > 0.05 and timing["worker_max_rss"] > 2**20
