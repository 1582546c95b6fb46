from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

import pandas as pd

from mergescale.job import log_to
from mergescale.report.plots import plot_barrier

with log_to(snakemake.log[0]) as log:
    plot_barrier(pd.read_csv(snakemake.input.curves), Path(snakemake.output[0]))
    log(f"wrote {snakemake.output[0]}")
