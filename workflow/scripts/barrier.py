from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

import pandas as pd

from mergescale.studies.cross_seed.barrier import BarrierPair, barrier_curves, barrier_heights, lm_eval_scorer
from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to, set_threads
from mergescale.tasks import read_jsonl

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p = snakemake.params
    cfg = dict(p.barrier)  # the plan's settings, defaults filled in (mergescale.studies.cross_seed.plan)
    alphas, limit = cfg["alphas"], cfg["limit"]
    rows = {Path(f).parent.name: read_jsonl(Path(f))[: cfg["examples"]] for f in snakemake.input.data}
    task_dir = Path(snakemake.input.tasks[0]).parent

    def scorer(tasks):
        return lm_eval_scorer(task_dir, tasks, limit, p.batch_size, p.seed, log)

    pairs = [(BarrierPair("bases", Path(snakemake.input.base_a), Path(snakemake.input.base_b),
                          [r for t in sorted(rows) for r in rows[t]], "all"), scorer(p.score_tasks))]
    for task, a, b in zip(p.expert_tasks, snakemake.input.experts_a, snakemake.input.experts_b):
        pairs.append((BarrierPair(f"expert:{task}", Path(a), Path(b), rows[task], "answer"), scorer([task])))
    curves = pd.concat([barrier_curves(pair, alphas, score, p.max_iter, p.seed, log) for pair, score in pairs])
    heights = barrier_heights(curves)
    log(heights.to_string(index=False))
    atomic_write_text(Path(snakemake.output.curves), curves.to_csv(index=False))
    atomic_write_text(Path(snakemake.output.heights), heights.to_csv(index=False))
