"""The cross-seed study's plan, from the config's optional `cross_seed` section.

Which experts each cross-seed merge takes from base A and from base B, which models the
workflow evaluates, what the barrier rule compares; config errors name the key.
Imports no torch: the workflow reads it while parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergescale.tasks.combos import parse_combo
from mergescale.errors import ConfigError

# name -> (description, paper); implemented in mergescale.studies.cross_seed.merge
CROSS_SEED_METHODS = {
    "average": ("Uniform average of the experts of both bases, without alignment.",
                "Wortsman et al. 2022, Model soups, https://arxiv.org/abs/2203.05482"),
    "weight_matching": ("Permute base B's experts onto base A's by weight matching, then average.",
                        "Ainsworth et al. 2023, Git Re-Basin, https://arxiv.org/abs/2209.04836"),
    "pleas": ("Weight matching, then per-layer least squares on validation activations (PLeaS).",
              "Nasery et al. 2025, PLeaS, https://arxiv.org/abs/2407.02447"),
}

DEFAULT_ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
# The section's defaults, the one place they are set (config/README.md describes each key).
DEFAULTS = {"max_iter": 100, "pleas": {"examples": 64, "ridge": 1e-4},
            "barrier": {"alphas": DEFAULT_ALPHAS, "examples": 100, "limit": 50}}
METHOD_PREFIX = "cross_"  # results/merged/{base_a}/cross_{method}/{combo}


@dataclass(frozen=True)
class CrossSeedPlan:
    base_a: str
    base_b: str
    combos: dict[str, tuple[list[str], list[str]]]  # combo -> (tasks from A, tasks from B)
    methods: list[str]
    expert_pairs: list[str]  # tasks whose experts of A and B get a barrier curve
    score_tasks: list[str]  # tasks the bases' barrier curves are scored on
    max_iter: int = DEFAULTS["max_iter"]  # weight-matching sweeps at most
    pleas: dict | None = None  # examples, ridge (DEFAULTS filled in)
    barrier: dict | None = None  # alphas (sorted), examples, limit (DEFAULTS filled in)

    def merged_dir(self, method: str, combo: str) -> str:
        return f"merged/{self.base_a}/{METHOD_PREFIX}{method}/{combo}"

    def model_dirs(self) -> list[str]:
        return [self.merged_dir(m, c) for m in self.methods for c in self.combos]

    def final_outputs(self) -> list[str]:
        return ["results/tables/barrier.csv", "results/plots/barrier.png"]

    def eval_batches(self) -> dict[str, list[str]]:
        """Its merges join the grid's batch of base A and the subset."""
        return {f"merged/{self.base_a}/{c}": [self.merged_dir(m, c) for m in self.methods] for c in self.combos}

    def own_bases(self) -> list[str]:
        return [self.base_b]

    def experts(self, combo: str) -> tuple[list[str], list[str]]:
        tasks_a, tasks_b = self.combos[combo]
        return ([f"results/experts/{self.base_a}/{t}" for t in tasks_a],
                [f"results/experts/{self.base_b}/{t}" for t in tasks_b])


def split_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """A subset's tasks alternate between the bases: even positions from A, odd from B."""
    return tasks[0::2], tasks[1::2]


def cross_seed_plan(config: dict, combos: dict[str, list[str]]) -> CrossSeedPlan | None:
    section = config.get("cross_seed")
    if not section:
        return None
    bases = config["bases"]
    a, b = section["base_a"], section["base_b"]
    for key, name in (("base_a", a), ("base_b", b)):
        if name not in bases:
            raise ConfigError(f"config key cross_seed.{key}: {name!r} is not in bases ({', '.join(bases)})")
    if a == b:
        raise ConfigError("config key cross_seed.base_b: must differ from base_a")
    if bases[a].get("shape") != bases[b].get("shape"):
        raise ConfigError(f"config key cross_seed.base_b: {b!r} must have the shape of {a!r}")
    if bases[a].get("pretrain", {}).get("seed", 0) == bases[b].get("pretrain", {}).get("seed", 0):
        raise ConfigError(f"config key cross_seed.base_b: {b!r} must be pretrained from another "
                          f"seed than {a!r} (bases.<name>.pretrain.seed)")
    ks = section.get("ks", [2])
    for k in ks:
        if k not in config["merge"]["ks"]:
            raise ConfigError(f"config key cross_seed.ks: k={k} is not in merge.ks {config['merge']['ks']}")
        if k < 2:
            raise ConfigError("config key cross_seed.ks: a cross-seed merge needs k >= 2")
    methods = section.get("methods", list(CROSS_SEED_METHODS))
    for m in methods:
        if m not in CROSS_SEED_METHODS:
            raise ConfigError(f"config key cross_seed.methods: {m!r} is not one of {sorted(CROSS_SEED_METHODS)}")
    barrier = section.get("barrier", {})
    held_in = config["tasks"]["held_in"]
    all_tasks = held_in + config["tasks"]["held_out"]
    pairs = barrier.get("expert_tasks", held_in[:1])
    for t in pairs:
        if t not in held_in:
            raise ConfigError(f"config key cross_seed.barrier.expert_tasks: {t!r} is not a held-in task")
    alphas = barrier.get("alphas", DEFAULT_ALPHAS)
    if min(alphas) != 0 or max(alphas) != 1:
        raise ConfigError("config key cross_seed.barrier.alphas: must include 0 and 1 (the two models)")
    score_tasks = barrier.get("score_tasks", config["tasks"]["held_out"] or held_in)
    for t in score_tasks:
        if t not in all_tasks:
            raise ConfigError(f"config key cross_seed.barrier.score_tasks: {t!r} is not a configured task")
    chosen = {c: split_tasks(tasks) for c, tasks in combos.items() if parse_combo(c)[0] in ks}
    pleas = {**DEFAULTS["pleas"], **section.get("pleas", {})}
    settings = {**DEFAULTS["barrier"], **{k: barrier[k] for k in ("examples", "limit") if k in barrier},
                "alphas": sorted(alphas)}
    return CrossSeedPlan(a, b, chosen, methods, pairs, score_tasks,
                         section.get("max_iter", DEFAULTS["max_iter"]), pleas, settings)
