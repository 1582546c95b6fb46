from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
import json
from pathlib import Path

from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to
from mergescale.evaluate.tuning import tuning_table

with log_to(snakemake.log[0]) as log:
    # results/tuning/{base}/{method}/{combo}.json
    records = {(Path(p).parts[-3], Path(p).parts[-2], Path(p).stem): json.loads(Path(p).read_text())
               for p in snakemake.input}
    atomic_write_text(Path(snakemake.output[0]), tuning_table(records))
    log(f"{len(records)} tuning records")
