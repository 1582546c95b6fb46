from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

import pandas as pd

from mergescale.report.aggregate import markdown_table
from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to
from mergescale.rule_methods.map_pareto import front_summary
from mergescale.report.plots import plot_map_front

with log_to(snakemake.log[0]) as log:
    front = pd.concat([pd.read_csv(f) for f in snakemake.input.fronts], ignore_index=True)
    summary = front_summary(front)
    atomic_write_text(Path(snakemake.output.csv), summary.to_csv(index=False))
    atomic_write_text(Path(snakemake.output.table), "\n".join([
        "# MAP Pareto fronts (validation exact match)", "",
        "best_*: the front point with the best predicted mean (the merged model that the "
        "other tables score on test); spread: max - min of the measured means of the "
        "evaluated front points; probe_fit_mae: mean |predicted - measured| over probes.", "",
        markdown_table(summary), ""]))
    plot_map_front(front, Path(snakemake.output.plot))
    log(f"{len(summary)} fronts -> {snakemake.output.table}")
