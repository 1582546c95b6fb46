"""How long a config's run will take, before running it.

    python benchmarks/study_time.py CONFIG [--cores 2] --measured RUN_DIR [RUN_DIR ...]
                                    [--rule-cpu RULE=S ...] [--scheduler-cpu S] [--plan FILE]
                                    [--check RUN_DIR]

Counts the jobs of CONFIG from a Snakemake dry run in an empty directory (every job
planned, as in a fresh clone; nothing is run), gives every job a CPU cost from the jobs
of real runs (--measured: run directories whose results/logs hold the timing line every
job writes, see benchmarks/workflow_time.py), and prints the predicted core-seconds per
rule and the wall time on --cores cores.

A planned job's cost comes from measured jobs of the same rule and model size (the base's
parameter count, within a factor 1.3; any size if that size was not measured, flagged
with `~`; a multitask fine-tune or an instruction tuning not measured at a size takes
that size's expert fine-tunes: the same loop), and of the same method when measured:
  training rules (pretrain, instruction tuning, fine-tunes): a fixed part plus CPU
      seconds per step x the job's steps (from CONFIG); a measured job's steps and loop
      time come from its training card, and the loop's share of its wall time splits its
      CPU into the two parts;
  rules whose work grows with a count (k for jobs of an expert subset, models for an
      evaluation batch): a least-squares line over the measured counts when they differ,
      else their mean (an evaluation batch: proportional to its models);
  every other rule: the mean of the measured jobs.
CPU seconds, not wall: a measured run may share its cores with other work. A job the
run's worker ran costs its client's CPU (the benchmark file) plus the worker child's (the
timing line). Rules without a timing line (shell rules) take --rule-cpu values (defaults
in SHELL_RULE_CPU, measured by hand).

Wall time on N cores = the DAG build (timed: the dry run builds the same DAG)
 + the worker's imports + the serial tail (aggregate_scores, write_findings, plot_figures run after every
 other job) + (every other job's CPU + Snakemake's scheduling CPU per job x jobs) / N.
It assumes the cores stay busy (a grid of many bases keeps both busy; the longest job is
printed, a lower bound on any wall time).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflow_time import job_records  # noqa: E402

# Rules whose cost is training steps: CPU per step x steps.
TRAINING_RULES = ("pretrain_base", "instruct_base", "finetune_expert", "finetune_multitask")
# Where a training job writes its card, below results/ (from the job's path below the rule).
TRAINING_OUTPUT = {"pretrain_base": "bases", "instruct_base": "bases",
                   "finetune_expert": "experts", "finetune_multitask": "multitask"}
# A training rule without measured jobs takes the per-step cost of another rule that runs
# the same training loop (finetune.py) at the same size.
TRAINING_FALLBACK = {"finetune_multitask": "finetune_expert", "instruct_base": "finetune_expert"}
# Rules whose work is per unit (training step, model of an evaluation batch): measured
# at one count only, their cost scales with the count.
PROPORTIONAL_RULES = TRAINING_RULES + ("evaluate_batch",)
# Run after every other job, one after another: their time is not shared by the cores.
SERIAL_RULES = ("aggregate_scores", "write_findings", "plot_figures")
# Rules with no timing line: CPU seconds per job, measured by hand on this machine
# (2026-12-03: the shell command of unbatch_scores, `bash -c "python -m
# mergescale.evaluate.batch_member ..."`, 6 runs under /usr/bin/time, user+sys 0.04-0.05;
# `all` does nothing).
SHELL_RULE_CPU = {"unbatch_scores": 0.05, "all": 0.0}
# Snakemake's own CPU per job while it runs them (job selection, bookkeeping, output
# checks), measured on the slice run of docs/performance.md; --scheduler-cpu replaces it.
SCHEDULER_CPU_PER_JOB = 0.25
# One worker server's imports (docs/performance.md), once per run.
WORKER_START_CPU = 5.0
SIZE_TOLERANCE = 1.3


@dataclass
class Job:
    """A job, planned or measured: its rule, the path of its log below the rule's folder
    (its wildcards), the base's parameter count, k, method, and the count its work grows
    with (steps for training, models for an evaluation batch, else k)."""

    rule: str
    path: str
    parameters: int | None = None
    k: int | None = None
    method: str | None = None
    units: float | None = None
    cpu: float | None = None
    startup: float | None = None  # share of the job's time before its work (measured jobs)
    info: dict = field(default_factory=dict)


COMBO = re.compile(r"\bk(\d+)s\d+\b")


def split_path(path: str, bases) -> tuple[str | None, str | None, int | None]:
    """(base, method, k) of a job path such as tiny-s/ties/k2s0 or merged/tiny-s/ties/k2s0:
    the base is the first component that names one, the method the component after it
    when a subset follows."""
    parts = path.split("/")
    combo = COMBO.search(path)
    k = int(combo.group(1)) if combo else None
    for i, part in enumerate(parts):
        if part in bases:
            rest = parts[i + 1:]
            method = rest[0] if len(rest) >= 2 and COMBO.fullmatch(rest[-1]) else None
            return part, method, k
    return None, None, k


# --- measured jobs --------------------------------------------------------------------

def safetensors_parameters(path: Path) -> int | None:
    """Parameter count of a safetensors file, from its header (no tensor is read)."""
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, spec in header.items():
        if name != "__metadata__":
            n = 1
            for d in spec["shape"]:
                n *= d
            total += n
    return total


def measured_jobs(run_dir: Path) -> list[Job]:
    """Every finished job of a run with its CPU seconds and the attributes its cost
    depends on, read from the run's outputs."""
    results = run_dir / "results"
    bases = {p.name: safetensors_parameters(p / "model.safetensors")
             for p in (results / "bases").glob("*") if (p / "model.safetensors").exists()}
    records = job_records(run_dir)
    clients = [r["client_cpu"] for r in records if r["client_cpu"] is not None and r["worker_cpu"] is not None]
    client_cpu = statistics.median(clients) if clients else 0.0
    jobs = []
    for r in records:
        if r["worker_cpu"] is not None:  # the worker ran it: its client plus the child
            cpu = (r["client_cpu"] if r["client_cpu"] is not None else client_cpu) + r["worker_cpu"]
        elif r["client_cpu"] is not None:
            cpu = r["client_cpu"]
        elif r["timing"] is not None:  # its own process, no benchmark file: wall as an upper bound
            cpu = r["timing"]["work_end"] - r["timing"]["process_start"]
        else:
            continue
        base, method, k = split_path(r["path"], bases)
        job = Job(r["rule"], r["path"], bases.get(base), k, method, cpu=cpu,
                  startup=startup_share(r["timing"]))
        job.units = measured_units(results, job)
        if job.rule in TRAINING_RULES:
            job.info = training_split(results, job, r["timing"])
        jobs.append(job)
    return jobs


def startup_share(timing: dict | None) -> float | None:
    """The share of a job's time before its work (interpreter, imports, hand-over)."""
    if not timing:
        return None
    total = timing["work_end"] - timing["process_start"]
    return (timing["work_start"] - timing["process_start"]) / total if total > 0 else None


def training_card(results: Path, job: Job) -> dict | None:
    try:
        return json.loads((results / TRAINING_OUTPUT[job.rule] / job.path / "training_card.json").read_text())
    except (OSError, ValueError):
        return None


def training_split(results: Path, job: Job, timing: dict | None) -> dict:
    """A training job's CPU as fixed (start-up, data, saving) + per step: the training
    loop's share of the job's wall time (the card's train_seconds) applied to its CPU."""
    card = training_card(results, job)
    if not card or not timing or not job.units or "train_seconds" not in card:
        return {}
    wall = timing["work_end"] - timing["process_start"]
    loop = min(1.0, card["train_seconds"] / wall) if wall > 0 else 1.0
    return {"fixed": job.cpu * (1 - loop), "per_step": job.cpu * loop / job.units}


def measured_units(results: Path, job: Job) -> float | None:
    if job.rule in TRAINING_RULES:
        card = training_card(results, job)
        try:
            return float(card["config"]["steps"])
        except (TypeError, KeyError, ValueError):
            return None
    if job.rule == "evaluate_batch":
        try:
            return float(len(json.loads((results / "evals" / "batches" / f"{job.path}.json").read_text())["models"]))
        except (OSError, ValueError, KeyError):
            return None
    return float(job.k) if job.k is not None else None


# --- planned jobs ---------------------------------------------------------------------

def dry_run(config: Path, snakefile: Path) -> tuple[str, float, float]:
    """Snakemake's dry-run listing of CONFIG in an empty directory, with the wall and CPU
    seconds it took (the real run builds the same DAG first)."""
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(snakefile),
             "--directory", tmp, "--configfile", str(config.resolve())],
            capture_output=True, text=True, check=False, cwd=ROOT)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n --configfile {config} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stdout + proc.stderr, wall, cpu


def parse_dry_run(text: str) -> list[dict]:
    """[{rule, log, output, input, wildcards}] of every job a dry-run listing names."""
    jobs, job = [], None
    for line in text.splitlines():
        m = re.fullmatch(r"(?:local)?rule (\w+):", line.strip())
        if m:
            job = {"rule": m.group(1), "wildcards": {}}
            jobs.append(job)
            continue
        if job is None or not line.startswith("    "):
            continue
        key, _, value = line.strip().partition(": ")
        if key in ("log", "output", "input"):
            job[key] = [v.strip() for v in value.split(",") if v.strip()]
        elif key == "wildcards":
            job["wildcards"] = dict(kv.split("=", 1) for kv in value.split(", ") if "=" in kv)
    return jobs


def planned_jobs(config: dict, listing: list[dict]) -> list[Job]:
    from mergescale.sources.grid import base_labels, finetune_settings

    labels = base_labels(config["bases"])
    held_in = config["tasks"]["held_in"]
    jobs = []
    for entry in listing:
        rule = entry["rule"]
        if entry.get("log"):  # results/logs/<rule>/<path>.log or results/logs/<rule>.log
            path = entry["log"][0].removeprefix("results/logs/").removesuffix(".log")
            path = path.removeprefix(rule).removeprefix("/")
        else:
            path = "/".join(entry["wildcards"].values())
        base, method, k = split_path(path, labels)
        method = entry["wildcards"].get("method", method)
        job = Job(rule, path, labels[base]["parameters"] if base else None, k, method)
        if rule == "pretrain_base":
            job.units = config["bases"][base]["pretrain"]["steps"]
        elif rule == "instruct_base":
            job.units = config["bases"][base]["train"]["steps"]
        elif rule == "finetune_expert":
            job.units = finetune_settings(config, base, "expert")["steps"]
        elif rule == "finetune_multitask":
            tasks = len(held_in) if k is None else k
            job.units = finetune_settings(config, base, "multitask")["steps_per_task"] * tasks
        elif rule == "evaluate_batch":
            job.units = sum(1 for p in entry.get("input", []) if not p.startswith("results/tasks/"))
        elif k is not None:
            job.units = k
        jobs.append(job)
    return jobs


# --- costs ------------------------------------------------------------------------------

def same_size(a: int | None, b: int | None) -> bool:
    if a is None or b is None:
        return a is b
    return max(a, b) / max(1, min(a, b)) <= SIZE_TOLERANCE


def fit(points: list[tuple[float, float]], units: float | None, proportional: bool) -> float:
    """CPU of a job with `units` from measured (units, cpu) points: a line through them
    when they have two counts or more; with one count, proportional to the count for
    rules whose work is per unit (PROPORTIONAL_RULES), else their mean."""
    cpus = [c for _, c in points]
    known = [(u, c) for u, c in points if u is not None]
    if units is None or not known:
        return statistics.fmean(cpus)
    xs = {u for u, _ in known}
    if len(xs) < 2:
        if proportional:
            return statistics.fmean(c / u for u, c in known if u) * units
        return statistics.fmean(c for _, c in known)
    mx = statistics.fmean(u for u, _ in known)
    my = statistics.fmean(c for _, c in known)
    slope = sum((u - mx) * (c - my) for u, c in known) / sum((u - mx) ** 2 for u, _ in known)
    return max(0.0, my + slope * (units - mx))


def job_cost(job: Job, measured: list[Job], rule_cpu: dict[str, float]) -> tuple[float | None, str]:
    """(CPU seconds, how: '' measured at this size, '~' at another size, 'fixed', 'none')."""
    if job.rule in rule_cpu:
        return rule_cpu[job.rule], "fixed"
    of_rule = [m for m in measured if m.rule == job.rule]
    if job.rule in TRAINING_FALLBACK and not any(same_size(m.parameters, job.parameters) for m in of_rule):
        of_rule = [m for m in measured if m.rule == TRAINING_FALLBACK[job.rule]] or of_rule
    if not of_rule:
        return None, "none"
    sized = [m for m in of_rule if same_size(m.parameters, job.parameters)]
    how = "" if sized else "~"
    pool = sized or of_rule
    if job.method is not None:
        pool = [m for m in pool if m.method == job.method] or pool
    split = [m.info for m in pool if "per_step" in m.info]
    if job.rule in TRAINING_RULES and split and job.units is not None:
        return (statistics.fmean(i["fixed"] for i in split)
                + statistics.fmean(i["per_step"] for i in split) * job.units), how
    proportional = job.rule in PROPORTIONAL_RULES
    return fit([(m.units, m.cpu) for m in pool], job.units, proportional), how


@dataclass
class Prediction:
    per_rule: dict[str, dict]
    jobs: int
    job_cpu: float
    serial_cpu: float
    scheduler_cpu: float
    dag_cpu: float
    worker_cpu: float
    unknown: dict[str, int]
    longest: tuple[float, str]

    def wall(self, cores: int) -> float:
        parallel = self.job_cpu - self.serial_cpu + self.scheduler_cpu
        return self.dag_cpu + self.worker_cpu + self.serial_cpu + parallel / cores


def predict(planned: list[Job], measured: list[Job], rule_cpu: dict[str, float],
            scheduler_cpu_per_job: float, dag_cpu: float) -> Prediction:
    per_rule, unknown, longest = {}, {}, (0.0, "")
    startup = {}
    for m in measured:
        if m.startup is not None:
            startup.setdefault(m.rule, []).append(m.startup)
    for job in planned:
        cpu, how = job_cost(job, measured, rule_cpu)
        row = per_rule.setdefault(job.rule, {"jobs": 0, "cpu": 0.0, "other_size": 0, "startup": 0.0})
        row["jobs"] += 1
        if cpu is None:
            unknown[job.rule] = unknown.get(job.rule, 0) + 1
            continue
        row["cpu"] += cpu
        row["other_size"] += how == "~"
        if job.rule in startup:
            row["startup"] += cpu * statistics.fmean(startup[job.rule])
        if cpu > longest[0]:
            longest = (cpu, f"{job.rule} {job.path}")
    job_cpu = sum(r["cpu"] for r in per_rule.values())
    serial = sum(per_rule[r]["cpu"] for r in SERIAL_RULES if r in per_rule)
    return Prediction(per_rule, len(planned), job_cpu, serial, scheduler_cpu_per_job * len(planned),
                      dag_cpu, WORKER_START_CPU, unknown, longest)


def report(pred: Prediction, cores: int, out=None) -> None:
    out = out or sys.stdout
    print(f"{'rule':26s} {'jobs':>6s} {'CPU s/job':>9s} {'core-s':>9s} {'share':>6s} {'start-up':>8s}",
          file=out)
    for rule, row in sorted(pred.per_rule.items(), key=lambda kv: -kv[1]["cpu"]):
        n = row["jobs"]
        if rule in pred.unknown:
            print(f"{rule:26s} {n:6d} {'n/a':>9s}  not measured", file=out)
            continue
        flag = f"  ~{row['other_size']} at another size" if row["other_size"] else ""
        print(f"{rule:26s} {n:6d} {row['cpu'] / n:9.2f} {row['cpu']:9.0f} "
              f"{100 * row['cpu'] / pred.job_cpu if pred.job_cpu else 0:5.1f}% "
              f"{100 * row['startup'] / row['cpu'] if row['cpu'] else 0:7.0f}%{flag}", file=out)
    startup = sum(r["startup"] for r in pred.per_rule.values())
    total = pred.job_cpu + pred.scheduler_cpu + pred.dag_cpu + pred.worker_cpu
    print(f"jobs: {pred.jobs}, their CPU {pred.job_cpu:.0f} s (start-up {startup:.0f} s, "
          f"{100 * startup / pred.job_cpu if pred.job_cpu else 0:.0f}%)", file=out)
    print(f"Snakemake: DAG build {pred.dag_cpu:.0f} s + scheduling {pred.scheduler_cpu:.0f} s; "
          f"worker imports {pred.worker_cpu:.0f} s; overhead {100 * (total - pred.job_cpu + startup) / total:.0f}% "
          f"of {total:.0f} core-s (start-up, scheduling, DAG, worker)", file=out)
    print(f"serial tail ({', '.join(SERIAL_RULES)}): {pred.serial_cpu:.0f} s; longest job "
          f"{pred.longest[0]:.0f} s ({pred.longest[1]})", file=out)
    if pred.unknown:
        print("not measured (no cost counted): " + ", ".join(f"{r} x{n}" for r, n in pred.unknown.items()),
              file=out)
    wall = pred.wall(cores)
    print(f"predicted wall on {cores} idle cores: {wall:.0f} s = {wall / 60:.1f} min", file=out)


def check(run_dir: Path, measured: list[Job], rule_cpu: dict[str, float], out=None) -> None:
    """Predicted against measured CPU for the finished jobs of another run (one that gave
    no costs): the estimator's error per rule, before any wall-time assumption."""
    rows = {}
    for job in measured_jobs(run_dir):
        planned = Job(job.rule, job.path, job.parameters, job.k, job.method, job.units)
        cpu, _ = job_cost(planned, measured, rule_cpu)
        if cpu is not None:
            row = rows.setdefault(job.rule, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += cpu
            row[2] += job.cpu
    print(f"check against {run_dir}: {'rule':22s} {'jobs':>5s} {'predicted s':>11s} {'measured s':>10s} {'ratio':>6s}",
          file=out)
    for rule, (n, predicted, actual) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        print(f"  {rule:22s} {n:5d} {predicted:11.1f} {actual:10.1f} {predicted / actual if actual else 0:6.2f}", file=out)
    predicted, actual = sum(r[1] for r in rows.values()), sum(r[2] for r in rows.values())
    print(f"  {'all':22s} {sum(r[0] for r in rows.values()):5d} {predicted:11.1f} {actual:10.1f} "
          f"{predicted / actual if actual else 0:6.2f}", file=out)


def parse_rule_cpu(items: list[str]) -> dict[str, float]:
    out = dict(SHELL_RULE_CPU)
    for item in items:
        rule, _, value = item.partition("=")
        try:
            out[rule] = float(value)
        except ValueError:
            raise SystemExit(f"--rule-cpu {item!r}: expected RULE=SECONDS") from None
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--measured", type=Path, nargs="+", required=True, metavar="RUN_DIR")
    p.add_argument("--rule-cpu", nargs="*", default=[], metavar="RULE=S")
    p.add_argument("--scheduler-cpu", type=float, default=SCHEDULER_CPU_PER_JOB,
                   help="Snakemake's CPU seconds per job (default %(default)s)")
    p.add_argument("--snakefile", type=Path, default=ROOT / "workflow" / "Snakefile")
    p.add_argument("--check", type=Path, metavar="RUN_DIR",
                   help="also predict the finished jobs of this run and compare with their CPU")
    p.add_argument("--plan", type=Path, help="JSON file that keeps the dry run's jobs: written "
                   "when missing, read when present (the config must not have changed)")
    args = p.parse_args(argv)
    import yaml

    if not args.config.exists():
        raise SystemExit(f"{args.config}: no such config")
    config = yaml.safe_load(args.config.read_text())
    measured = [job for run in args.measured for job in measured_jobs(run)]
    if not measured:
        raise SystemExit(f"no timed jobs under {', '.join(map(str, args.measured))} (results/logs)")
    if args.plan and args.plan.exists():  # a dry run saved before: the same config's plan
        saved = json.loads(args.plan.read_text())
        listing, wall, cpu = saved["jobs"], saved["wall_s"], saved["cpu_s"]
    else:
        text, wall, cpu = dry_run(args.config, args.snakefile)
        listing = parse_dry_run(text)
        if args.plan:
            args.plan.write_text(json.dumps({"config": str(args.config), "wall_s": wall, "cpu_s": cpu,
                                             "jobs": listing}))
    planned = planned_jobs(config, listing)
    print(f"{args.config}: {len(planned)} jobs planned (dry run {wall:.0f} s wall, {cpu:.0f} CPU s); "
          f"costs from {len(measured)} measured jobs in {', '.join(map(str, args.measured))}")
    rule_cpu = parse_rule_cpu(args.rule_cpu)
    report(predict(planned, measured, rule_cpu, args.scheduler_cpu, cpu), args.cores)
    if args.check:
        check(args.check, measured, rule_cpu)


if __name__ == "__main__":
    main()
