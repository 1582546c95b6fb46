from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to
from mergescale.tasks import write_task_yaml
from mergescale.tasks.lmeval_yaml import write_rows_task_yaml

with log_to(snakemake.log[0]) as log:
    wc = snakemake.wildcards
    # The data path stays relative to the working directory, where lm-eval runs.
    if "description" in snakemake.params.keys():  # rows of a public lm-eval task
        write_rows_task_yaml(wc.task, wc.split if "split" in wc.keys() else "validation",
                             snakemake.input[0], Path(snakemake.output[0]),
                             snakemake.params.description, snakemake.params.cluster)
    else:
        write_task_yaml(wc.task, wc.split, snakemake.input[0], Path(snakemake.output[0]))
    log(f"wrote {snakemake.output[0]}")
