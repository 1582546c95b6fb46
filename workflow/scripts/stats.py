from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.merge.statistics import compute_and_save

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    compute_and_save(Path(snakemake.input.expert), Path(snakemake.input.data), Path(snakemake.output[0]),
                     examples=snakemake.params.examples, log=log)
