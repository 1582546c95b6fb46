from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from mergescale.job import log_to, set_threads
from mergescale.rule_methods.lora_lego import merge_lora_lego
from mergescale.rule_methods.registry import resolve_params

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    merge_lora_lego(
        base_dir=snakemake.input.base,
        expert_dirs=list(snakemake.input.experts),
        out_dir=snakemake.output[0],
        params=resolve_params("lora_lego", p.params),
        seed=p.seed,
        dtype=p.dtype,
        log=log,
    )
