"""Wall time of a workflow run with the job worker and without it, in one sitting.

    python benchmarks/worker_speed.py [--configfile config/smoke.yaml] [--cores 2]
                                      [--order worker,plain] [--out benchmarks/.cache/worker]

Runs the workflow from scratch once per mode, in a fresh directory under --out: `worker`
(the default: jobs are forked by mergescale.worker) and `plain` (MERGESCALE_WORKER=0,
every job its own interpreter, as before the worker). For each run it prints the wall
time, the load average sampled every 5 s while it ran (other users' load slows both
modes), how many worker servers started and the CPU of their imports (no job's), and
benchmarks/workflow_time.py's split of the jobs' time into start-up, work and other.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(mode: str, configfile: Path, cores: int, workdir: Path) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = dict(os.environ)
    env["MERGESCALE_WORKER"] = "1" if mode == "worker" else "0"
    loads, done = [], threading.Event()

    def sample():
        while not done.wait(5):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile",
                           str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
                           "--configfile", str(configfile), "--cores", str(cores)],
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    done.set()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    server_logs = [p.read_text() for p in (workdir / ".snakemake" / "mergescale-worker").glob("*.log")]
    servers = sum(len(re.findall(r"worker \d+ listening", text)) for text in server_logs)
    import_cpu = sum(float(cpu) for text in server_logs
                     for cpu in re.findall(r"modules in [\d.]+ s \(([\d.]+) CPU s\)", text))
    split = subprocess.run([sys.executable, str(REPO / "benchmarks" / "workflow_time.py"),
                            str(workdir), "--wall", f"{wall:.1f}", "--cores", str(cores)],
                           capture_output=True, text=True, check=True).stdout
    return {"wall": wall, "load": sum(loads) / len(loads) if loads else os.getloadavg()[0],
            "servers": servers, "import_cpu": import_cpu, "split": split}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configfile", type=Path, default=REPO / "config" / "smoke.yaml")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--order", default="worker,plain", help="modes, in the order to run them")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / ".cache" / "worker")
    args = p.parse_args(argv)
    results = {}
    for mode in args.order.split(","):
        results[mode] = r = run(mode, args.configfile, args.cores, args.out / f"{args.configfile.stem}-{mode}")
        print(f"== {mode}: {r['wall']:.0f} s wall, mean load average {r['load']:.1f} on "
              f"{os.cpu_count()} cores, {r['servers']} worker server(s) started (their imports: "
              f"{r['import_cpu']:.1f} CPU s)\n{r['split']}", flush=True)
    if {"worker", "plain"} <= set(results):
        print(f"plain / worker wall time: {results['plain']['wall'] / results['worker']['wall']:.2f}x")


if __name__ == "__main__":
    main()
