from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.rule_methods.atlas import merge_atlas
from mergescale.job import log_to, set_threads
from mergescale.tasks import read_jsonl

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    settings = dict(p.settings)
    examples = settings.pop("examples", 16)
    rows = [row for path in snakemake.input.data for row in read_jsonl(Path(path))[:examples]]
    merge_atlas(snakemake.wildcards.amethod, Path(snakemake.input.base),
                [Path(e) for e in snakemake.input.experts], rows, Path(snakemake.output[0]),
                seed=p.seed, dtype=p.dtype, log=log, **settings)
