"""Job plumbing: the timing line every job log ends with, read back by benchmarks/workflow_time.py."""

import subprocess
import sys

import pytest

from mergescale.job import log_to, read_timing


def test_a_finished_job_log_ends_with_its_time_split(tmp_path):
    log = tmp_path / "logs" / "rule" / "job.log"
    with log_to(log) as say:
        say("working")
    timing = read_timing(log)
    assert log.read_text().startswith("working\n")
    assert timing["process_start"] <= timing["work_start"] <= timing["work_end"]


def test_a_failed_job_log_has_the_traceback_and_no_timing(tmp_path):
    log = tmp_path / "job.log"
    with pytest.raises(ValueError):
        with log_to(log):
            raise ValueError("bad input in tensor x")
    assert "bad input in tensor x" in log.read_text()
    assert read_timing(log) is None


def test_start_up_is_measured_from_the_process_start(tmp_path):
    """A fresh interpreter that sleeps before its work: start-up covers the sleep."""
    log = tmp_path / "job.log"
    code = ("import time; time.sleep(0.3)\n"
            "from mergescale.job import log_to\n"
            f"with log_to({str(log)!r}): pass\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    timing = read_timing(log)
    assert timing["work_start"] - timing["process_start"] >= 0.3
