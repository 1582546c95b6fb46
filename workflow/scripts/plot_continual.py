from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
import json
from pathlib import Path

import pandas as pd

from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to
from mergescale.rule_methods.opcm import continual_normalized
from mergescale.report.plots import plot_continual

with log_to(snakemake.log[0]) as log:
    curves = pd.concat([pd.read_csv(f) for f in snakemake.input.curves], ignore_index=True)
    experts = {}
    for path in snakemake.input.experts:  # results/evals/experts/{base}/{task}/scores.json
        base, task = Path(path).parts[-3:-1]
        for s in json.loads(Path(path).read_text())["scores"]:
            if s["task"] == task and s["split"] == "test":
                experts[(base, task)] = s["value"]
    normalized = continual_normalized(curves, experts)
    atomic_write_text(Path(snakemake.output[1]), normalized.to_csv(index=False))
    plot_continual(normalized, Path(snakemake.output[0]))
    log(f"{len(curves)} continual scores -> {snakemake.output[0]}")
