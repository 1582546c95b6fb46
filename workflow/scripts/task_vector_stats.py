from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.io_utils import atomic_write_json
from mergescale.job import log_to, set_threads
from mergescale.merge.task_vectors import task_vector_stats

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    experts = dict(zip(snakemake.params.tasks, map(Path, snakemake.input.experts)))
    stats = task_vector_stats(Path(snakemake.input.base), experts)
    atomic_write_json(Path(snakemake.output[0]), stats)
    log(" ".join(f"{t}: {e['relative_norm']:.3f}" for t, e in stats["experts"].items()))
