from mergescale.worker import delegate; delegate(snakemake)  # noqa: E702  run by the worker: docs/performance.md
from pathlib import Path

from mergescale.report.aggregate import normalized_scores, summary_latex, summary_markdown, tidy_scores
from mergescale.io_utils import atomic_write_text
from mergescale.job import log_to

with log_to(snakemake.log[0]) as log:
    p = snakemake.params
    combos = dict(p.combos)
    scores = tidy_scores(list(snakemake.input.scores), p.held_in, p.held_out, combos,
                         dict(p.base_labels))
    normalized = normalized_scores(scores, p.held_in, p.held_out, combos)
    out = snakemake.output
    atomic_write_text(Path(out.scores), scores.to_csv(index=False))
    atomic_write_text(Path(out.normalized), normalized.to_csv(index=False))
    atomic_write_text(Path(out.summary), summary_markdown(scores, normalized, p.held_in, p.held_out))
    atomic_write_text(Path(out.latex), summary_latex(normalized))
    log(f"{len(scores)} score rows from {len(snakemake.input.scores)} models")
