from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.sources.grid import REPLAY_PREFIX
from mergescale.training.stages import finetune

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    data = {k: Path(v) for k, v in snakemake.input.items() if k != "base"}
    replay = {k.removeprefix(REPLAY_PREFIX): data.pop(k) for k in list(data) if k.startswith(REPLAY_PREFIX)}
    finetune(Path(snakemake.input.base), dict(snakemake.params.train), data,
             Path(snakemake.output[0]), stage=snakemake.params.stage, log=log,
             chat_template=snakemake.params.chat_template, replay_files=replay)
