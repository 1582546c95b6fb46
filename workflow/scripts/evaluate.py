from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.evaluate.harness import evaluate_and_save, request_from_params
from mergescale.job import log_to, set_threads

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    request = request_from_params(snakemake.input.model, snakemake.input.tasks, snakemake.params)
    evaluate_and_save(request, Path(snakemake.output[0]), log=log)
