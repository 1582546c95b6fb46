from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.rule_methods.map_pareto import run_map_job
from mergescale.rule_methods.registry import resolve_params

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    wc = snakemake.wildcards
    run_map_job(
        base_dir=snakemake.input.base,
        expert_dirs=dict(zip(p.tasks, snakemake.input.experts)),
        out_dir=snakemake.output.model,
        front_csv=snakemake.output.front,
        task_dir=Path(snakemake.input.tasks[0]).parent,
        params=resolve_params("map", p.params),
        labels={"setting": wc.method, "base": wc.base, "combo": wc.combo},
        dtype=p.dtype,
        seed=p.seed,
        batch_size=p.batch_size,
        limit=p.limit,
        log=log,
    )
