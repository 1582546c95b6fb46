"""Run the real workflow from tests: subprocess Snakemake in a scratch directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SMOKE_CONFIG = REPO / "config" / "smoke.yaml"


def snakemake(workdir: Path, *args: str, config: Path = SMOKE_CONFIG, check: bool = True,
              timeout: int = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
           "--directory", str(workdir), "--configfile", str(config), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def planned_jobs(workdir: Path, config: Path = SMOKE_CONFIG) -> dict[str, int]:
    """Rule -> number of jobs a dry run would execute (empty when nothing to do)."""
    proc = snakemake(workdir, "-n", "--quiet", "rules", config=config)
    text = proc.stdout + proc.stderr
    counts = {}
    for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", text, flags=re.M):
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def planned_outputs(workdir: Path, rule: str, config: Path = SMOKE_CONFIG) -> list[str]:
    """Output paths of the jobs of `rule` that a dry run would execute."""
    proc = snakemake(workdir, "-n", config=config)
    text = proc.stdout + proc.stderr
    outs = []
    for block in re.split(r"\n\s*\n", text):
        if re.search(rf"^(local)?rule {rule}:", block.strip(), flags=re.M):
            m = re.search(r"output: (.+)", block)
            if m:
                outs.append(m.group(1).strip())
    return outs


def planned_job_resources(workdir: Path, *args: str, config: Path = SMOKE_CONFIG) -> list[dict]:
    """Every job of a dry run as {rule, wildcards: {...}, resources: {...}} (numbers as
    ints); run from the repository root, where profiles name their files."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory",
           str(workdir), "--configfile", str(config), "-n", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    jobs = []
    for block in re.split(r"\n\s*\n", proc.stdout + proc.stderr):
        rule = re.search(r"^(?:local)?rule (\w+):", block.strip(), flags=re.M)
        res = re.search(r"^\s*resources: (.+)$", block, flags=re.M)
        if not rule or not res:
            continue
        wildcards = re.search(r"^\s*wildcards: (.+)$", block, flags=re.M)
        resources = {}
        for item in res.group(1).split(", "):
            key, _, value = item.partition("=")
            resources[key] = int(value) if value.isdigit() else value
        jobs.append({"rule": rule.group(1), "local": block.strip().startswith("localrule"),
                     "wildcards": dict(w.split("=", 1) for w in wildcards.group(1).split(", "))
                     if wildcards else {}, "resources": resources})
    return jobs
