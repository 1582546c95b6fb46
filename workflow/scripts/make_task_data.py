from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to
from mergescale.tasks import make_splits, write_jsonl

with log_to(snakemake.log[0]) as log:
    task = snakemake.wildcards.task
    splits = make_splits(task, snakemake.params.sizes, seed=snakemake.params.seed)
    for path in snakemake.output:
        split = Path(path).stem
        write_jsonl(splits[split], Path(path))
        log(f"{task}/{split}: {len(splits[split])} examples -> {path}")
