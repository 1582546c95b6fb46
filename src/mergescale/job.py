"""Job plumbing for workflow scripts: logging to the rule's `log:` file, thread budget,
and the job's own split of its time into start-up and work."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# The last line of every job log: when the process started, when the script's work began
# (after the interpreter, Snakemake's script preamble and the script's top-level imports)
# and when it ended. benchmarks/workflow_time.py splits each rule's time with it. A job
# run by the worker (mergescale.worker) also records the CPU seconds and peak RSS of the
# worker's child: Snakemake's benchmark file only sees the job's own process.
TIMING_PREFIX = "# mergescale job timing: "


def _process_start() -> float:
    """When the job's process started (in the worker: the job's client process), on the
    time.time() clock. Linux: from /proc to 10 ms (psutil's create_time can be off by up
    to a second: it adds whole-second boot time); elsewhere psutil."""
    from mergescale import worker

    pid = worker.job_request["client_pid"] if worker.job_request else os.getpid()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # timing is informative only; never fail a job over it
        return float("nan")


def timing_line(process_start: float, work_start: float, work_end: float) -> str:
    record = {"process_start": process_start, "work_start": work_start, "work_end": work_end}
    record.update(_worker_usage())
    return TIMING_PREFIX + json.dumps(record)


def _worker_usage() -> dict:
    """CPU seconds and peak RSS of this worker child so far ({} outside the worker)."""
    from mergescale import worker

    if worker.job_request is None:
        return {}
    import resource

    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    scale = 1 if sys.platform == "darwin" else 1024
    return {"worker_cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            "worker_max_rss": max(own.ru_maxrss, children.ru_maxrss) * scale}


def read_timing(log: str | Path) -> dict | None:
    """The timing record of a job log, or None (a shell rule, or a job that failed)."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines[-5:]):
        if line.startswith(TIMING_PREFIX):
            return json.loads(line[len(TIMING_PREFIX):])
    return None


@contextmanager
def log_to(path: str | Path):
    """Send stdout and stderr (Python, warnings, tracebacks) to ``path`` line-buffered."""
    work_start = time.time()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as fh:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        try:
            yield lambda msg: print(msg, flush=True)
        except BaseException:
            import traceback

            traceback.print_exc(file=fh)
            raise
        else:
            print(timing_line(_process_start(), work_start, time.time()), file=fh)
        finally:
            sys.stdout, sys.stderr = old_out, old_err


def set_threads(n: int) -> None:
    """Give torch the rule's `threads` (it would otherwise take every core)."""
    import torch  # imported here: data and report jobs need no torch

    torch.set_num_threads(max(1, int(n)))
