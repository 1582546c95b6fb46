from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.evaluate.harness import evaluate_batch_and_save, request_from_params
from mergescale.job import log_to, set_threads

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    models = [Path(m) for m in snakemake.input.models]
    template = request_from_params(models[0], snakemake.input.tasks, snakemake.params)
    evaluate_batch_and_save(template, models, Path(snakemake.output[0]), log=log)
