from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.rule_methods.opcm import run_opcm_job
from mergescale.rule_methods.registry import resolve_params

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    run_opcm_job(
        base_dir=snakemake.input.base,
        expert_dirs=dict(zip(p.tasks, snakemake.input.experts)),
        out_dir=snakemake.output.model,
        curves_csv=snakemake.output.curves,
        task_dir=Path(snakemake.input.tasks[0]).parent,
        params=resolve_params("opcm", p.params),
        labels={"setting": snakemake.wildcards.method, "base": snakemake.wildcards.base,
                "combo": snakemake.wildcards.combo},
        dtype=p.dtype,
        seed=p.seed,
        batch_size=p.batch_size,
        limit=p.limit,
        log=log,
    )
