from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.rule_methods.registry import RuleJob, get_rule_method

# Any rule-method: its registered run() with the config entry's params (checked, defaults
# filled in), the inputs it declares it needs, and its own outputs besides the model.
with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p, wc = snakemake.params, snakemake.wildcards
    method = get_rule_method(p.rule)
    outputs = {k: Path(v) for k, v in snakemake.output.items() if k != "model"}
    method.run(RuleJob(
        method=wc.method,
        base=Path(snakemake.input.base),
        experts=[Path(e) for e in snakemake.input.experts],
        tasks=list(p.tasks),
        out_dir=Path(snakemake.output.model),
        params=method.resolve(dict(p.params), where="params."),
        seed=p.seed,
        dtype=p.dtype,
        data={n: [Path(f) for f in getattr(snakemake.input, n)] for n in method.needs if n in snakemake.input.keys()},
        outputs=outputs,
        evaluate=dict(p.evaluate),
        labels={"setting": wc.method, "base": wc.base, "combo": wc.combo},
        log=log,
    ))
