from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from mergescale.report.findings import write_findings
from mergescale.job import log_to

with log_to(snakemake.log[0]) as log:
    write_findings(snakemake.input.normalized, snakemake.output[0])
    log(f"wrote {snakemake.output[0]}")
