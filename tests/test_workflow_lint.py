"""The workflow's rule files are clean for Snakemake's linter and formatted by snakefmt
(pinned in pyproject's test extras; its settings in [tool.snakefmt]). Either failing
fails `make test`, with the linter's or formatter's own report."""

from __future__ import annotations

import os
import subprocess
import sys

from workflow_helpers import REPO


def _run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_snakemake_lint_is_clean(tmp_path):
    """The default config turns every rule on (grid, rule-methods, studies)."""
    proc = _run("snakemake", "--lint", "--snakefile", str(REPO / "workflow" / "Snakefile"),
                "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"))
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "your workflow is in a good condition" in report, report[-6000:]


def test_snakefmt_check_is_clean():
    proc = _run("snakefmt", "--check", "--diff", "workflow")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_no_merge_conflict_markers_in_tracked_files():
    """A conflict left in a doc or a config reads as content; git's markers never belong."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    markers = ("<<<<<<< ", "=======\n", ">>>>>>> ")
    found = []
    for name in files:
        path = REPO / name
        if path.suffix not in {".md", ".py", ".yaml", ".yml", ".smk", ".toml", ".txt", ".cfg"}:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(True), 1):
            if line.startswith(markers) or line == "=======":
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
