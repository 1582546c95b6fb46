from pathlib import Path

import pandas as pd

from mergescale.plots import plot_normalized_vs_k
from mergescale.job import log_to

with log_to(snakemake.log[0]) as log:
    plot_normalized_vs_k(pd.read_csv(snakemake.input.normalized), Path(snakemake.output[0]))
    log(f"wrote {snakemake.output[0]}")
