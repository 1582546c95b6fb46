from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
import json
from pathlib import Path

from mergescale.merge import MergeRequest
from mergescale.merge.data_aware import merge_with_data
from mergescale.job import log_to, set_threads

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    params = dict(p.params)
    if snakemake.input.tuning:  # a tuned method: the validation search chose the params
        record = json.loads(Path(snakemake.input.tuning).read_text())
        params = record["chosen"]
        log(f"hyperparameters chosen on the validation split: {params}")
    experts = [Path(e) for e in snakemake.input.experts]
    log(f"{p.method} of {len(experts)} experts: {', '.join(e.name for e in experts)}")
    # Data-aware methods: statistics of compute_stats, or validation data for their fit.
    stats = [Path(s) for s in snakemake.input.get("stats", [])] or None
    data = [Path(d) for d in snakemake.input.get("data", [])] or None
    result = merge_with_data(MergeRequest(
        method=p.method,
        base=Path(snakemake.input.base),
        experts=experts,
        out_dir=Path(snakemake.output[0]),
        params=params,
        dtype=p.dtype,
        seed=p.seed,
        threads=snakemake.threads,
        stats=stats,
    ), data, log=log)
    log(f"done in {result.card['wall_time_s']:.2f}s, peak RSS {result.card['peak_rss_bytes'] / 2**20:.0f} MiB")
