"""results/run.json: when, at which commit and on which machine a run ran, step by step.

`make run` and `make study` time each step (the install, each grid's Snakemake run) in
the shell and add it here with `mergescale record-run`; the results page
(`mergescale results`) reads the record for its date, commit, machine and wall time:

    {"commit": "...", "dirty": false, "machine": {"cores": 2, "cpu": "...", "ram_gib": 7.8, ...},
     "config": "config/study.yaml",           # the config of the first grid: results/ is its tree
     "start": "...Z", "end": "...Z", "wall_seconds": 8100.0,
     "steps": [{"name": "install", "start": ..., "end": ..., "seconds": ...},
               {"name": "config/study.yaml", "config": ..., "results": "results", ...}, ...]}

The wall time is from the first step's start to the last step's end. A run resumed after
a kill starts a new record (`--new`): its wall time is the resumed part only.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from mergescale.io_utils import atomic_write_text


class RunRecordError(ValueError):
    """A run record that cannot be read or a time that cannot be parsed."""


def parse_time(text: str, what: str = "time") -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise RunRecordError(f"{what} {text!r} is not an ISO 8601 time (e.g. 2026-12-03T14:05:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def utc_text(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def machine() -> dict:
    """Cores, CPU model, RAM and system of this machine (Linux /proc where available)."""
    cpu, ram = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
                break
    except OSError:
        pass
    if ram is None and hasattr(os, "sysconf"):
        try:
            ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        except (ValueError, OSError):
            pass
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_gib": ram,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def git_commit(repo: Path | str = ".") -> tuple[str | None, bool | None]:
    """(HEAD's hash, whether tracked files differ from it); (None, None) outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


def read_record(path: Path | str) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunRecordError(f"{path}: not a run record ({e})") from None


def record_step(path: Path | str, name: str, start: str, end: str | None = None,
                config: str | None = None, results: str | None = None, new: bool = False,
                repo: Path | str = ".") -> dict:
    """Add one timed step to the record at `path` (a new record with `new`); the commit and
    machine are those of this call. Returns the record written."""
    path = Path(path)
    t0 = parse_time(start, "--start")
    t1 = parse_time(end, "--end") if end else datetime.now(timezone.utc)
    record = (None if new else read_record(path)) or {"steps": []}
    step = {"name": name, "start": utc_text(t0), "end": utc_text(t1),
            "seconds": round((t1 - t0).total_seconds(), 1)}
    if config:
        step["config"] = config
        step["results"] = results or "results"
        record.setdefault("config", config)
    record["steps"].append(step)
    commit, dirty = git_commit(repo)
    record.update(commit=commit, dirty=dirty, machine=machine())
    first = min(parse_time(s["start"]) for s in record["steps"])
    last = max(parse_time(s["end"]) for s in record["steps"])
    record.update(start=utc_text(first), end=utc_text(last),
                  wall_seconds=round((last - first).total_seconds(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record
