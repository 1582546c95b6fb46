from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.rule_methods.registry import resolve_params
from mergescale.rule_methods.twin_merging import TwinParams, build_twin

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    card = build_twin(
        base=Path(snakemake.input.base),
        experts=[Path(e) for e in snakemake.input.experts],
        tasks=list(p.tasks),
        validation_files=[Path(f) for f in snakemake.input.validation],
        out_dir=Path(snakemake.output[0]),
        params=TwinParams(**resolve_params("twin_merging", dict(p.params))),
        seed=p.seed,
        dtype=p.dtype,
        log_fn=log,
    )
    log(f"done in {card['wall_time_s']:.2f}s, peak RSS {card['peak_rss_bytes'] / 2**20:.0f} MiB, "
        f"storage {card['storage_bytes']}")
