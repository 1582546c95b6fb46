"""The aTLAS comparison's plan, from the config's optional `atlas` section: which bases
and expert subsets get an aTLAS merge and a validation-tuned task-arithmetic merge from
the same labelled examples. Imports no torch: the workflow reads it while parsing."""

from __future__ import annotations

from mergescale.tasks.combos import parse_combo
from mergescale.errors import ConfigError

# name -> (description, paper); implemented in mergescale.rule_methods.atlas
ATLAS_METHODS = {
    "atlas": ("Task arithmetic with one coefficient per expert and parameter block, learned by "
              "gradient descent on labelled validation examples (aTLAS).",
              "Zhang et al. 2024, Knowledge Composition using Task Vectors with Learned Anisotropic "
              "Scaling, https://arxiv.org/abs/2407.02880"),
    "task_arithmetic_tuned": ("Task arithmetic with one coefficient for all experts, chosen by line "
                              "search on the same labelled validation examples as aTLAS.",
                              "Ilharco et al. 2023, Editing models with task arithmetic, "
                              "https://arxiv.org/abs/2212.04089"),
}


def atlas_plan(config: dict, combos: dict[str, list[str]]) -> dict[str, list[str]] | None:
    """{model dir below results/: its expert tasks} for every aTLAS-study merge."""
    section = config.get("atlas")
    if not section:
        return None
    bases = section.get("bases", list(config["bases"])[:1])
    for b in bases:
        if b not in config["bases"]:
            raise ConfigError(f"config key atlas.bases: {b!r} is not in bases ({', '.join(config['bases'])})")
    ks = section.get("ks", [2])
    for k in ks:
        if k not in config["merge"]["ks"]:
            raise ConfigError(f"config key atlas.ks: k={k} is not in merge.ks {config['merge']['ks']}")
    methods = section.get("methods", list(ATLAS_METHODS))
    return {f"merged/{b}/{m}/{c}": tasks for b in bases for m in methods
            for c, tasks in combos.items() if parse_combo(c)[0] in ks}
