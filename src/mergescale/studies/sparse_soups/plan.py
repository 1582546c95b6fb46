"""The Sparse Model Soups study's plan, from the config's optional `sparse_soups` section.

Which (base, task) experts are pruned and retrained, for how many prune-retrain cycles,
with which seeds and learning rates per retrained copy; which models the workflow
evaluates. Config errors name the key. Imports no torch: the workflow reads it while
parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergescale.errors import ConfigError

PAPER = ("Zimmer, Spiegel & Pokutta 2024, Sparse Model Soups: A Recipe for Improved Pruning "
         "via Model Averaging (ICLR), https://arxiv.org/abs/2306.16788")
SCOPES = ("global", "layer")
# Models of one cycle that the evaluate rule scores: results/sparse/{base}/{task}/c{cycle}/<name>
MODELS = {"soup": "sparse_soup", "best_copy": "sparse_best_copy"}  # dir name -> method in tables
DEFAULTS = {"copies": 3, "scope": "global", "examples": None}


@dataclass(frozen=True)
class SparseSoupsPlan:
    bases: list[str]
    tasks: list[str]
    sparsities: list[float]  # cycle c (1-based) prunes to sparsities[c - 1]
    copies: int
    lrs: list[float] | None  # per copy; None: every copy uses retrain.lr
    retrain: dict  # training settings of every retrained copy (mergescale.training.loop.TrainConfig)
    scope: str  # "global" or "layer" magnitude pruning
    examples: int | None  # validation examples for the losses that pick the best copy (None: all)

    @property
    def cycles(self) -> list[int]:
        return list(range(1, len(self.sparsities) + 1))

    def cycle_dir(self, base: str, task: str, cycle: int) -> str:
        return f"results/sparse/{base}/{task}/c{cycle}"

    def start_dir(self, base: str, task: str, cycle: int) -> str:
        """Cycle 1 prunes the dense expert; every later cycle the previous cycle's soup."""
        if cycle == 1:
            return f"results/experts/{base}/{task}"
        return f"{self.cycle_dir(base, task, cycle - 1)}/soup"

    def copy_settings(self, cycle: int) -> list[dict]:
        """Training settings of each copy: its own seed (data order) in every cycle, and
        its own learning rate when `lrs` is given."""
        seed = self.retrain.get("seed", 0)
        out = []
        for i in range(self.copies):
            spec = {**self.retrain, "seed": seed + (cycle - 1) * self.copies + i}
            if self.lrs:
                spec["lr"] = self.lrs[i]
            out.append(spec)
        return out

    def units(self) -> list[tuple[str, str, int]]:
        return [(b, t, c) for b in self.bases for t in self.tasks for c in self.cycles]

    def model_dirs(self) -> list[str]:
        """Models the evaluate rule scores, as paths below results/."""
        return [f"{self.cycle_dir(b, t, c)}/{name}".removeprefix("results/")
                for b, t, c in self.units() for name in MODELS]

    def card_paths(self) -> list[str]:
        return [f"{self.cycle_dir(b, t, c)}/cycle_card.json" for b, t, c in self.units()]

    def final_outputs(self) -> list[str]:
        return ["results/tables/sparse_soups.md", "results/plots/sparse_soups.png"]

    def eval_batches(self) -> dict[str, list[str]]:
        """The soups and best copies of one (base, task), every cycle, in one batch."""
        return {f"sparse/{b}/{t}": [f"sparse/{b}/{t}/c{c}/{name}" for c in self.cycles for name in MODELS]
                for b in self.bases for t in self.tasks}

    def own_bases(self) -> list[str]:
        return []


def sparse_soups_plan(config: dict) -> SparseSoupsPlan | None:
    section = config.get("sparse_soups")
    if not section:
        return None
    key = "config key sparse_soups"
    bases = section.get("bases", list(config["bases"])[:1])
    for b in bases:
        if b not in config["bases"]:
            raise ConfigError(f"{key}.bases: {b!r} is not in bases ({', '.join(config['bases'])})")
        if config["bases"][b].get("chat_template"):
            raise ConfigError(f"{key}.bases: {b!r} uses a chat template; sparse soups support "
                              f"plain-prompt bases only")
    held_in = config["tasks"]["held_in"]
    lm_eval = config["tasks"].get("lm_eval", {})
    tasks = section.get("tasks", held_in[:1])
    for t in tasks:
        if t not in held_in:
            raise ConfigError(f"{key}.tasks: {t!r} is not a held-in task (tasks.held_in: "
                              f"{', '.join(held_in)}); only held-in tasks have an expert to prune")
        if t in lm_eval:
            raise ConfigError(f"{key}.tasks: {t!r} is a public lm-eval task; sparse soups retrain "
                              f"on a procedural task's train split")
    sparsities = [float(s) for s in section.get("sparsities", [])]
    if not sparsities:
        raise ConfigError(f"{key}.sparsities: give one target sparsity per prune-retrain cycle")
    for i, s in enumerate(sparsities):
        if not 0 < s < 1:
            raise ConfigError(f"{key}.sparsities[{i}]: {s} is not in (0, 1)")
        if i and s <= sparsities[i - 1]:
            raise ConfigError(f"{key}.sparsities[{i}]: {s} must exceed the previous cycle's "
                              f"{sparsities[i - 1]} (each cycle prunes the previous soup further)")
    copies = section.get("copies", DEFAULTS["copies"])
    if not isinstance(copies, int) or copies < 1:
        raise ConfigError(f"{key}.copies: {copies!r} is not a positive integer")
    lrs = section.get("lrs")
    if lrs is not None:
        if len(lrs) != copies:
            raise ConfigError(f"{key}.lrs: {len(lrs)} learning rates for {copies} copies "
                              f"(give one per copy, or none)")
        if any(not 0 < lr <= 1 for lr in lrs):
            raise ConfigError(f"{key}.lrs: every learning rate must be in (0, 1], not {lrs}")
    retrain = dict(section.get("retrain") or {})
    if "steps" not in retrain:
        raise ConfigError(f"{key}.retrain.steps: required (optimiser steps of each retrained copy)")
    if "lora" in retrain:
        raise ConfigError(f"{key}.retrain.lora: retraining a pruned model updates its weights; "
                          f"LoRA adapters would fill the pruned entries when folded")
    retrain.setdefault("seed", config["seed"])
    scope = section.get("scope", DEFAULTS["scope"])
    if scope not in SCOPES:
        raise ConfigError(f"{key}.scope: {scope!r} is not one of {SCOPES}")
    examples = section.get("examples", DEFAULTS["examples"])
    if examples is not None and (not isinstance(examples, int) or examples < 1):
        raise ConfigError(f"{key}.examples: {examples!r} is not a positive integer")
    return SparseSoupsPlan(list(bases), list(tasks), sparsities, copies,
                           None if lrs is None else [float(x) for x in lrs], retrain, scope, examples)
