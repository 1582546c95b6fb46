from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.evaluate.tuning import tune_merge
from mergescale.merge.search_space import search_space

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    fixed = dict(p.fixed)
    tune_merge(
        method=p.method, base=Path(snakemake.input.base),
        experts=[Path(e) for e in snakemake.input.experts],
        space=search_space(p.method, p.tune if isinstance(p.tune, bool) else dict(p.tune), fixed,
                           k=len(p.tasks)),
        fixed=fixed, task_dir=Path(snakemake.input.tasks[0]).parent, tasks=list(p.tasks),
        out=Path(snakemake.output[0]), dtype=p.dtype, seed=p.seed,
        batch_size=p.batch_size, limit=p.limit, log=log,
    )
