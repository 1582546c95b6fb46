from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
import json
from pathlib import Path

from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to
from mergescale.merge.task_vectors import stats_markdown

with log_to(snakemake.log[0]) as log:
    stats = {Path(p).stem: json.loads(Path(p).read_text()) for p in snakemake.input}
    atomic_write_text(Path(snakemake.output[0]), stats_markdown(stats))
    log(f"task-vector statistics of {len(stats)} base(s)")
