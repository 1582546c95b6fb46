"""Studies: experiments beside the merge grid, each with its own output tree and rules
(workflow/rules/studies/cross_seed.smk, sparse_soups.smk), configured by a
top-level config section (`cross_seed`, `sparse_soups`).

The workflow sees every study through one small interface, `StudyPlan`: the models it
adds (evaluated like every model), the batches they are scored in, the final outputs it
adds to `rule all`, and the bases only it uses (not part of the grid). common.smk loops
over `study_plans(config, combos)`; it names no study. Imports no torch.
"""

from __future__ import annotations

from typing import Protocol


class StudyPlan(Protocol):
    def model_dirs(self) -> list[str]:
        """Models the study adds, as paths below results/; each is evaluated."""

    def eval_batches(self) -> dict[str, list[str]]:
        """{batch group: model dirs} of its models scored together by evaluate_batch (a
        group may be one the grid's models join, e.g. merged/{base}/{combo})."""

    def final_outputs(self) -> list[str]:
        """Tables and figures of the study that `rule all` asks for."""

    def own_bases(self) -> list[str]:
        """Bases that only this study uses: trained, but not merged or evaluated by the grid."""


def study_plans(config: dict, combos: dict[str, list[str]]) -> list[StudyPlan]:
    """The plans of the studies the config turns on, in a fixed order."""
    from mergescale.studies.cross_seed.plan import cross_seed_plan
    from mergescale.studies.sparse_soups.plan import sparse_soups_plan

    plans = [cross_seed_plan(config, combos), sparse_soups_plan(config)]
    return [p for p in plans if p is not None]
