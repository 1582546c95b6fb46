from pathlib import Path

from mergescale.evaluate import EvalRequest, evaluate_and_save
from mergescale.job import log_to, set_threads

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    request = EvalRequest(
        model_dir=Path(snakemake.input.model),
        task_dir=Path(snakemake.input.tasks[0]).parent if snakemake.input.tasks else None,
        tasks=tuple(tuple(t) for t in p.tasks),
        backend=p.backend,
        batch_size=p.batch_size,
        limit=p.limit,
        seed=p.seed,
        lm_eval_tasks=dict(p.lm_eval_tasks),
        apply_chat_template=p.chat_template,
    )
    evaluate_and_save(request, Path(snakemake.output[0]), log=log)
