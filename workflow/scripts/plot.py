from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

import pandas as pd

from mergescale.job import log_to
from mergescale.report.plots import (
    plot_base_quality, plot_merged_vs_multitask, plot_normalized_vs_k, plot_other_methods)

with log_to(snakemake.log[0]) as log:
    normalized = pd.read_csv(snakemake.input.normalized)
    out = snakemake.output
    for quality, path in zip(snakemake.params.qualities, out.normalized_vs_k):
        log(f"{path}: {plot_normalized_vs_k(normalized, quality, Path(path))}")
    log(f"{out.vs_multitask}: {plot_merged_vs_multitask(normalized, Path(out.vs_multitask))}")
    log(f"{out.base_quality}: {plot_base_quality(normalized, Path(out.base_quality))}")
    log(f"{out.other_methods}: {plot_other_methods(normalized, Path(out.other_methods))}")
