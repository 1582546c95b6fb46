from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.studies.cross_seed.merge import merge_cross_seed
from mergescale.job import log_to, set_threads
from mergescale.tasks import read_jsonl

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    pleas = dict(p.pleas)  # the plan's settings, defaults filled in (mergescale.studies.cross_seed.plan)
    rows = [row for path in snakemake.input.data for row in read_jsonl(Path(path))[: pleas["examples"]]]
    merge_cross_seed(
        snakemake.wildcards.xmethod,
        [Path(e) for e in snakemake.input.experts_a],
        [Path(e) for e in snakemake.input.experts_b],
        Path(snakemake.output[0]),
        rows=rows,
        ridge=pleas["ridge"],
        max_iter=p.max_iter,
        seed=p.seed,
        dtype=p.dtype,
        log=log,
    )
