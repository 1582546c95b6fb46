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
