import json
from pathlib import Path

from mergescale.merge import MergeRequest, run_merge
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
    result = run_merge(MergeRequest(
        method=p.method,
        base=Path(snakemake.input.base),
        experts=experts,
        out_dir=Path(snakemake.output[0]),
        params=params,
        dtype=p.dtype,
        seed=p.seed,
        threads=snakemake.threads,
    ))
    log(f"done in {result.card['wall_time_s']:.2f}s, peak RSS {result.card['peak_rss_bytes'] / 2**20:.0f} MiB")
