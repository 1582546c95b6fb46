"""SLURM support: a real local cluster, and the Snakemake SLURM profiles.

Tests marked ``slurm`` run real jobs on the single-node cluster that
``scripts/local_slurm.sh`` starts (see tests/slurm_fixtures.py: needs root,
skipped without it except under CI=true, where they fail instead).

The profile tests need no cluster: they run Snakemake with the real
``workflow/profiles/slurm`` and ``slurm-local`` profiles against stand-in
``sbatch``/``squeue``/... commands that record what would be submitted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slurm_fixtures import LOCAL_PROFILE, SLURM_PROFILE, base_env, slurm_env  # noqa: F401

SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# Two rules, three SLURM jobs: `make` twice (in parallel), then `combine`.
# Each job writes the SLURM job id it ran under.
TWO_RULE_SNAKEFILE = textwrap.dedent(
    """
    SAMPLES = ["x", "y"]

    rule combine:
        input: expand("out/{s}.txt", s=SAMPLES)
        output: "out/combined.txt"
        shell: 'cat {input} > {output} && echo "combine job=$SLURM_JOB_ID host=$SLURMD_NODENAME" >> {output}'

    rule make:
        output: "out/{s}.txt"
        shell: 'echo "make {wildcards.s} job=$SLURM_JOB_ID host=$SLURMD_NODENAME" > {output}'
    """
)


def _run(cmd, *, env, cwd, timeout) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def _job_id(line: str, what: str) -> str:
    # "make x job=12 host=vm" -> "12"
    for word in line.split():
        if word.startswith("job="):
            job_id = word.removeprefix("job=")
            assert job_id.isdigit(), f"{what} did not run inside a SLURM job: {line!r}"
            return job_id
    raise AssertionError(f"no job id in {what}: {line!r}")


def _squeue_jobs(env) -> dict[str, tuple[str, str]]:
    """job id -> (state, comment) of all jobs slurmctld still knows (MinJobAge)."""
    proc = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T|%k"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    )
    jobs = {}
    for line in proc.stdout.splitlines():
        job_id, state, comment = line.strip().split("|", 2)
        jobs[job_id] = (state, comment)
    return jobs


# ------------------------------------------------------------------ cluster --


@pytest.mark.slurm
def test_sbatch_wait_runs_a_real_job(slurm_env, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "job=$SLURM_JOB_ID node=$SLURMD_NODENAME cpus=$SLURM_CPUS_ON_NODE"\n'
        "srun --ntasks=1 echo step-ok\n"
    )
    out = tmp_path / "job.out"
    proc = _run(
        ["sbatch", "--wait", "--parsable", "--job-name=mergescale-test", f"--output={out}",
         "--ntasks=1", "--cpus-per-task=1", "--mem=100", "--time=2", str(script)],
        env=slurm_env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, f"sbatch failed:\n{proc.stdout}\n{proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), proc.stdout
    text = out.read_text()
    assert _job_id(text.splitlines()[0], "batch script") == job_id
    assert "step-ok" in text, text  # a job step (srun) inside the job ran too
    assert _squeue_jobs(slurm_env)[job_id][0] == "COMPLETED"


def _check_workflow_went_through_slurm(workdir: Path, proc, env) -> None:
    log = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"snakemake failed:\n{log}"

    combined = (workdir / "out" / "combined.txt").read_text().splitlines()
    assert len(combined) == 3, combined
    assert combined[0].startswith("make x job="), combined
    assert combined[1].startswith("make y job="), combined
    assert combined[2].startswith("combine job="), combined
    ids = {
        "make_x": _job_id((workdir / "out" / "x.txt").read_text(), "make x"),
        "make_y": _job_id((workdir / "out" / "y.txt").read_text(), "make y"),
        "combine": _job_id(combined[2], "combine"),
    }
    assert len(set(ids.values())) == 3, f"each job must be its own SLURM job: {ids}"

    # slurmctld knows these jobs, finished, tagged with the rule by the executor
    known = _squeue_jobs(env)
    for what, job_id in ids.items():
        assert job_id in known, f"{what}: SLURM job {job_id} unknown to squeue: {known}"
        state, comment = known[job_id]
        assert state == "COMPLETED", (what, state)
        assert comment.startswith("rule_" + what.split("_")[0]), (what, comment)
        assert f"with SLURM jobid {job_id}" in proc.stdout + proc.stderr, log


@pytest.mark.slurm
def test_snakemake_slurm_executor_runs_jobs_on_the_cluster(slurm_env, tmp_path):
    (tmp_path / "Snakefile").write_text(TWO_RULE_SNAKEFILE)
    proc = _run(
        SNAKEMAKE + [
            "--executor", "slurm",
            "--slurm-no-account",
            "--slurm-status-command", "squeue",
            "--slurm-init-seconds-before-status-checks", "3",
            "--jobs", "2",
            "--latency-wait", "5",
            "--default-resources", "mem_mb=500", "runtime=5",
            "--snakefile", "Snakefile",
        ],
        env=slurm_env, cwd=tmp_path, timeout=300,
    )
    _check_workflow_went_through_slurm(tmp_path, proc, slurm_env)


@pytest.mark.slurm
def test_slurm_local_profile_runs_on_the_cluster(slurm_env, tmp_path):
    # one job (target out/x.txt) keeps this short; the two-rule run is above
    (tmp_path / "Snakefile").write_text(TWO_RULE_SNAKEFILE)
    proc = _run(
        SNAKEMAKE + ["--profile", str(LOCAL_PROFILE), "--snakefile", "Snakefile", "out/x.txt"],
        env=slurm_env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, f"snakemake failed:\n{proc.stdout}\n{proc.stderr}"
    job_id = _job_id((tmp_path / "out" / "x.txt").read_text(), "make x")
    assert _squeue_jobs(slurm_env)[job_id] == ("COMPLETED", "rule_make_wildcards_x")


# ----------------------------------------------------------------- profiles --

# Jobs as the workflow sizes them (mergescale.resources): a forward-pass job asks for a
# GPU where the profile declares GPUs, a streaming merge does not; both name memory,
# minutes and CPUs (at most the profile's max-threads). "other" leaves it to the profile.
SIZED = {"forward": "gpu=1, mem_mb=30000, runtime=200", "stream": "gpu=0, mem_mb=50000, runtime=100"}
CPUS = {"forward": 4, "stream": 8}
RULES = list(SIZED) + ["other"]
PROFILE_SNAKEFILE = "localrules: all\n\n" + "rule all:\n    input: {}\n\n".format(
    ", ".join(repr(f"out/{r}.txt") for r in RULES)
) + "".join(
    f"rule {r}:\n    threads: 4\n    output: 'out/{r}.txt'\n"
    + (f"    resources: {SIZED[r]}, cpus_per_task=lambda wc: min({CPUS[r]}, "
       "workflow.resource_settings.max_threads or 64)\n" if r in SIZED else "")
    + "    shell: 'touch {output}'\n\n"
    for r in RULES
)

# Stand-ins for the SLURM commands the executor calls. sbatch records its
# arguments, hands out job ids and "runs" the job by creating its output
# (out/RULE.txt, see PROFILE_SNAKEFILE); status queries report all COMPLETED.
FAKE_TOOL = textwrap.dedent(
    """\
    #!{python}
    import fcntl, json, os, sys
    from pathlib import Path
    state = Path(os.environ["FAKE_SLURM_DIR"])
    calls = state / "sbatch.jsonl"
    tool, args = Path(sys.argv[0]).name, sys.argv[1:]
    with open(state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        n = len(calls.read_text().splitlines()) if calls.exists() else 0
        if tool == "sbatch":
            with open(calls, "a") as f:
                f.write(json.dumps(args) + "\\n")
            rule = args[args.index("--comment") + 1].removeprefix("rule_")
            out = Path(args[args.index("-D") + 1]) / "out" / f"{{rule}}.txt"
            out.parent.mkdir(exist_ok=True)
            out.touch()
            print(n + 1)
        elif tool in ("squeue", "sacct") and "--name" in args:
            for i in range(1, n + 1):
                print(f"{{i}}|COMPLETED")
        elif tool == "scontrol":
            print("MinJobAge               = 300 sec")
        elif tool == "sinfo":
            print("PARTITION\\ncpu*\\ngpu")
        elif tool in ("sacctmgr", "sshare"):
            sys.exit(1)
    """
)


WORKFLOW_PROFILE = SLURM_PROFILE.parent / "default" / "config.yaml"


def _fake_submit(profile: Path, tmp_path: Path, workflow_profile: Path | None = None) -> dict[str, list[str]]:
    """Run the workflow above with `profile` on stand-in SLURM commands; rule -> sbatch argv.

    With `workflow_profile`, that file is the workflow's profiles/default/config.yaml,
    which Snakemake loads on top of --profile (as it does for workflow/Snakefile).
    """
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ["sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel", "sacctmgr", "sshare", "srun"]:
        path = bindir / tool
        path.write_text(FAKE_TOOL.format(python=sys.executable))
        path.chmod(0o755)
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(PROFILE_SNAKEFILE)
    # the profile names its partition file relative to the repository root, where it runs
    partitions = workdir / "workflow" / "profiles" / "slurm" / "partitions.yaml"
    partitions.parent.mkdir(parents=True)
    partitions.write_text((SLURM_PROFILE / "partitions.yaml").read_text())
    if workflow_profile is not None:
        (workdir / "profiles" / "default").mkdir(parents=True)
        (workdir / "profiles" / "default" / "config.yaml").write_text(workflow_profile.read_text())
    env = base_env()
    env["PATH"] = f"{bindir}:{env['PATH']}"
    env["FAKE_SLURM_DIR"] = str(tmp_path)
    env.pop("SLURM_CONF", None)
    proc = _run(
        SNAKEMAKE + ["--profile", str(profile), "--snakefile", "Snakefile",
                     "--retries", "0", "--keep-going", "--jobs", "20",
                     "--slurm-init-seconds-before-status-checks", "1"],
        env=env, cwd=workdir, timeout=180,
    )
    log = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"snakemake failed:\n{log}"
    calls_file = tmp_path / "sbatch.jsonl"
    submitted = {}
    for line in calls_file.read_text().splitlines():
        argv = [a for a in json.loads(line) if not a.startswith("--wrap=")]
        rule = argv[argv.index("--comment") + 1].removeprefix("rule_")
        submitted[rule] = argv
    assert sorted(submitted) == sorted(RULES), f"{sorted(submitted)}\n{log}"
    return submitted


def _opt(argv: list[str], name: str) -> str | None:
    """Value of `name VALUE` or `name=VALUE` in argv."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


EXPECTED = {  # rule: (partition, GPUs, memory MB, minutes, CPUs)
    "forward": ("gpu", "1", "30000", "200", "4"),  # chosen from partitions.yaml: it has GPUs
    "stream": ("cpu", None, "50000", "100", "8"),  # the partition without GPUs
}


def _check_sized_rules(submitted: dict[str, list[str]]) -> None:
    for rule, expected in EXPECTED.items():
        argv = submitted[rule]
        got = tuple(_opt(argv, o) for o in ("-p", "--gpus", "--mem", "-t", "--cpus-per-task"))
        assert got == expected, (rule, got, argv)
        assert _opt(argv, "--gres") is None, (rule, argv)


def test_cluster_profile_places_jobs_by_what_they_ask(tmp_path):
    submitted = _fake_submit(SLURM_PROFILE, tmp_path)
    _check_sized_rules(submitted)
    other = submitted["other"]  # a rule the workflow does not size: default-resources
    assert (_opt(other, "-p"), _opt(other, "--mem"), _opt(other, "-t")) == ("cpu", "4000", "60"), other
    assert _opt(other, "--gpus") is None and _opt(other, "--gres") is None, other


@pytest.mark.skipif(not WORKFLOW_PROFILE.exists(), reason="workflow has no profiles/default/config.yaml")
def test_cluster_profile_sized_rules_survive_the_workflow_profile(tmp_path):
    # workflow/profiles/default/ is loaded too and wins key by key (its `cores:` caps
    # threads): the jobs must still get their partition, GPU, memory, time and CPUs.
    _check_sized_rules(_fake_submit(SLURM_PROFILE, tmp_path, WORKFLOW_PROFILE))


def test_local_profile_requests_no_gpus_and_fits_a_small_node(tmp_path):
    # the profile declares no GPUs (gpu=0): a job asking for one gets none
    submitted = _fake_submit(LOCAL_PROFILE, tmp_path)
    for rule, argv in submitted.items():
        assert _opt(argv, "--gpus") is None and _opt(argv, "--gres") is None, (rule, argv)
        assert _opt(argv, "-A") is None, (rule, argv)
        assert int(_opt(argv, "--cpus-per-task")) <= 2, (rule, argv)
    assert int(_opt(submitted["other"], "--mem")) <= 2000
