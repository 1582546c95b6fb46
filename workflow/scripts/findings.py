from pathlib import Path

import pandas as pd

from mergescale.findings import findings_markdown
from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to

with log_to(snakemake.log[0]) as log:
    atomic_write_text(Path(snakemake.output[0]),
                      findings_markdown(pd.read_csv(snakemake.input.normalized)))
    log(f"wrote {snakemake.output[0]}")
