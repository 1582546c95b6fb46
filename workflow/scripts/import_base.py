from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.sources.gguf import import_gguf_base
from mergescale.job import log_to, set_threads

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    import_gguf_base(p.package, p.file, Path(snakemake.output[0]), log=log)
