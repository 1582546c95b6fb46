from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.job import log_to, set_threads
from mergescale.studies.sparse_soups.cycle import copy_scorer, run_cycle
from mergescale.tasks import read_jsonl

with log_to(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    p, inp, out = snakemake.params, snakemake.input, snakemake.output
    task = snakemake.wildcards.task
    val_rows = read_jsonl(Path(inp.validation))[: p.examples]  # examples None: every row
    scorer = copy_scorer(Path(inp.start), Path(inp.tasks).parent, task, "test", log=log, **p.evaluate)
    run_cycle(Path(inp.start), task, read_jsonl(Path(inp.train)), val_rows, sparsity=p.sparsity,
              settings=list(p.settings), soup_dir=Path(out.soup), best_dir=Path(out.best_copy),
              card_path=Path(out.card), cycle=int(snakemake.wildcards.cycle), scope=p.scope,
              score_copies=scorer, log=log)
