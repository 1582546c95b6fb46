from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.evaluate.ensemble import write_ensemble_spec
from mergescale.job import log_to

with log_to(snakemake.log[0]) as log:
    members = [Path(e) for e in snakemake.input.experts]
    write_ensemble_spec(Path(snakemake.output[0]), members)
    log(f"ensemble of {len(members)} experts: {', '.join(m.name for m in members)}")
