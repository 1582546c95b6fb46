from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
import json
from pathlib import Path

import pandas as pd

from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to
from mergescale.studies.sparse_soups.report import plot_sparse_soups, sparse_soups_table, table_markdown

with log_to(snakemake.log[0]) as log:
    cards = [(base, json.loads(Path(path).read_text()))
             for base, path in zip(snakemake.params.bases, snakemake.input.cards)]
    table = sparse_soups_table(pd.read_csv(snakemake.input.scores), cards)
    atomic_write_text(Path(snakemake.output.csv), table.to_csv(index=False))
    atomic_write_text(Path(snakemake.output.table), table_markdown(table))
    plot_sparse_soups(table, Path(snakemake.output.plot))
    log(f"{len(table)} rows -> {snakemake.output.table}")
