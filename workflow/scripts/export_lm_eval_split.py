from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to
from mergescale.tasks.lmeval_data import export_split

with log_to(snakemake.log[0]) as log:
    export_split(snakemake.params.lm_tasks, snakemake.params.split, Path(snakemake.output[0]), log=log)
