from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.sources.hub import fetch_model
from mergescale.job import log_to

with log_to(snakemake.log[0]) as log:
    fetch_model(dict(snakemake.params.source), Path(snakemake.output[0]), log=log)
