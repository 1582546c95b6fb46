"""Where a workflow run's time goes, and how long the rest of its plan will take.

    python benchmarks/workflow_time.py RUN_DIR [--configfile config/study.yaml] [--cores 2]

RUN_DIR is the directory the workflow ran in (its results/benchmarks/ holds one
Snakemake benchmark file per finished job). Prints, per rule, the finished jobs and
their wall and CPU seconds, and splits each job's wall time into
  start-up: process start to the script's work (interpreter, Snakemake's script
            preamble, top-level imports of torch/transformers/lm-eval),
  work:     the script's body (`mergescale.job.log_to`; imports done lazily inside it
            count as work),
  other:    what the benchmark saw around both (Snakemake's job wrapper and shell),
from the timing line every job writes at the end of its log. For jobs the run's worker
ran (mergescale.worker), start-up is the client's: its interpreter, Snakemake's preamble,
the hand-over and the fork; their CPU is the benchmark's (the client) plus the worker
child's, from the same line. With --wall (the run's wall
time in seconds) it also reports the scheduler's share: core-seconds the run had
(wall x cores) that no job used. With --configfile it also asks Snakemake (dry run) which
jobs are still to run and estimates their wall time on --cores cores: per rule, the
mean CPU seconds of its finished jobs, summed over the jobs left, divided by the cores
(a lower bound when jobs wait on each other; rules with no finished job yet are listed
apart, not guessed).
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mergescale.job import read_timing  # noqa: E402


def job_records(run_dir: Path) -> list[dict]:
    """One record per job of the run that left a benchmark file or a timing line:
    {rule, path (below the rule's folder, no suffix), wall (benchmark s or None),
    client_cpu (benchmark cpu_time or None), worker_cpu (the worker child's or None),
    timing (the log's timing record or None)}."""
    results = run_dir / "results"
    records = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
        if rows:
            rel = tsv.relative_to(results / "benchmarks").with_suffix("")
            cpu = rows[-1].get("cpu_time")
            records[rel] = {"wall": float(rows[-1]["s"]),
                            "client_cpu": float(cpu) if cpu not in (None, "", "NA") else None}
    for log in sorted((results / "logs").rglob("*.log")):
        rel = log.relative_to(results / "logs").with_suffix("")
        timing = read_timing(log)
        if timing is not None or rel in records:
            records.setdefault(rel, {"wall": None, "client_cpu": None})["timing"] = timing
    return [{"rule": rel.parts[0], "path": "/".join(rel.parts[1:]),
             "timing": rec.get("timing"),
             "worker_cpu": (rec.get("timing") or {}).get("worker_cpu_s"), **rec}
            for rel, rec in sorted(records.items())]


def finished_jobs(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """{rule: [(wall s, cpu s), ...]} from results/benchmarks/<rule>/**.tsv, plus the CPU
    of the worker's child for jobs the worker ran (the benchmark sees only the client)."""
    out = defaultdict(list)
    root = run_dir / "results" / "benchmarks"
    logs = run_dir / "results" / "logs"
    for tsv in sorted(root.rglob("*.tsv")):
        rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
        if not rows:
            continue
        rel = tsv.relative_to(root)
        rule = rel.parts[0].removesuffix(".tsv")
        cpu = float(rows[-1].get("cpu_time") or "nan")
        timing = read_timing((logs / rel).with_suffix(".log")) or {}
        out[rule].append((float(rows[-1]["s"]), cpu + timing.get("worker_cpu_s", 0.0)))
    return out


def job_splits(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """{rule: [(start-up s, work s), ...]} from the timing line of each job log."""
    out = defaultdict(list)
    root = run_dir / "results" / "logs"
    for log in sorted(root.rglob("*.log")):
        timing = read_timing(log)
        if timing is None:
            continue
        rule = log.relative_to(root).parts[0].removesuffix(".log")
        out[rule].append((timing["work_start"] - timing["process_start"],
                          timing["work_end"] - timing["work_start"]))
    return out


def planned_jobs(run_dir: Path, configfile: Path, snakefile: Path) -> dict[str, int]:
    """{rule: jobs still to run}, from Snakemake's dry-run summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(snakefile), "--directory",
         str(run_dir), "--configfile", str(configfile), "--quiet", "rules"],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed:\n{proc.stderr[-3000:]}")
    jobs = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--configfile", type=Path)
    p.add_argument("--snakefile", type=Path, default=Path(__file__).parents[1] / "workflow" / "Snakefile")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--wall", type=float, help="the run's wall time in seconds (scheduler share)")
    args = p.parse_args(argv)

    done = finished_jobs(args.run_dir)
    splits = job_splits(args.run_dir)
    print(f"{'rule':28s} {'jobs':>5s} {'wall s':>9s} {'cpu s':>9s} {'cpu s/job':>9s} "
          f"{'start-up':>9s} {'work':>9s} {'other':>9s} {'work %':>7s}")
    totals = {"wall": 0.0, "startup": 0.0, "work": 0.0}
    for rule, jobs in sorted(done.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        wall, cpu = sum(w for w, _ in jobs), sum(c for _, c in jobs)
        startup = sum(s for s, _ in splits.get(rule, []))
        work = sum(w for _, w in splits.get(rule, []))
        totals["wall"] += wall
        totals["startup"] += startup
        totals["work"] += work
        print(f"{rule:28s} {len(jobs):5d} {wall:9.1f} {cpu:9.1f} {cpu / len(jobs):9.1f} "
              f"{startup:9.1f} {work:9.1f} {wall - startup - work:9.1f} "
              f"{100 * work / wall if wall else 0:6.0f}%")
    light = {rule: jobs for rule, jobs in splits.items() if rule not in done}
    if light:  # rules without a benchmark file: their wall time is start-up + work
        startup = sum(s for jobs in light.values() for s, _ in jobs)
        work = sum(w for jobs in light.values() for _, w in jobs)
        print(f"rules without benchmark files ({', '.join(sorted(light))}): "
              f"{sum(map(len, light.values()))} jobs, start-up {startup:.1f} s + work {work:.1f} s "
              f"({100 * work / (startup + work) if startup + work else 0:.0f}% work)")
    total_cpu = sum(c for jobs in done.values() for _, c in jobs)
    print(f"finished: {sum(map(len, done.values()))} jobs, {total_cpu:.0f} CPU s "
          f"(>= {total_cpu / args.cores / 60:.1f} min of wall on {args.cores} cores)")
    if totals["wall"]:
        w = totals["wall"]
        print(f"job wall time: {w:.0f} s = start-up {totals['startup']:.0f} s "
              f"({100 * totals['startup'] / w:.0f}%) + work {totals['work']:.0f} s "
              f"({100 * totals['work'] / w:.0f}%) + other {w - totals['startup'] - totals['work']:.0f} s "
              f"({100 * (w - totals['startup'] - totals['work']) / w:.0f}%; shell rules have no split)")
    if args.wall:
        capacity = args.wall * args.cores
        print(f"run: {args.wall:.0f} s wall x {args.cores} cores = {capacity:.0f} core-s; jobs "
              f"occupied {totals['wall']:.0f} ({100 * totals['wall'] / capacity:.0f}%), their work "
              f"{totals['work']:.0f} ({100 * totals['work'] / capacity:.0f}%); the rest is "
              f"scheduling, idle cores and jobs waiting on each other")
    if args.configfile is None:
        return
    left = planned_jobs(args.run_dir, args.configfile, args.snakefile)
    estimate, unknown = 0.0, {}
    for rule, n in sorted(left.items()):
        if done.get(rule):
            estimate += n * sum(c for _, c in done[rule]) / len(done[rule])
        else:
            unknown[rule] = n
    print(f"left: {sum(left.values())} jobs; those of rules already timed need about "
          f"{estimate / args.cores / 3600:.2f} h of wall on {args.cores} cores "
          f"({estimate:.0f} CPU s at their rules' mean)")
    if unknown:
        print("not yet timed (no estimate): " + ", ".join(f"{r} x{n}" for r, n in unknown.items()))


if __name__ == "__main__":
    main()
