"""Where models and tasks come from, as the workflow config declares it.

A base is pretrained here (``source: pretrain``), fetched from the hub (``source: hub``,
``repo`` + ``revision``) or taken from a local directory (``source: local``, ``path``).
A base's experts are fine-tuned here unless ``bases.<name>.experts`` names one model per
held-in task to fetch instead. A task is a procedural family (the default) or, when
``tasks.lm_eval`` has an entry for its name, a set of public lm-eval tasks.
These helpers serve both the config checks and the Snakemake wiring.
"""

from __future__ import annotations


class SourceConfigError(ValueError):
    pass


def lm_eval_specs(config: dict) -> dict[str, dict]:
    return config["tasks"].get("lm_eval") or {}


def lm_eval_split_tasks(spec: dict, split: str) -> list[str]:
    """The lm-eval tasks whose rows make a task's `split` (train or validation): `train`,
    and for validation `validation` (one task or a list), else the `train` task."""
    names = spec.get("train") if split == "train" else spec.get("validation", spec.get("train"))
    return [] if names is None else [names] if isinstance(names, str) else list(names)


def needs_validation_rows(config: dict) -> bool:
    """Whether any merge reads validation data (tuning, statistics, fits, rule-methods)."""
    from mergescale.merge import MergeInputError, get_method
    from mergescale.rule_methods.registry import get_rule_method

    for spec in config["merge"]["methods"].values():
        if spec.get("tune"):
            return True
        if "rule" in spec:
            try:
                needs = get_rule_method(spec["rule"]).needs
            except MergeInputError:  # reported, with the key, by the method checks
                continue
            if {"validation_data", "validation_tasks"} & set(needs):
                return True
        if "method" in spec:
            try:
                method = get_method(spec["method"])
            except KeyError:  # reported, with the key, by the method checks
                continue
            if method.needs_data or method.needs_stats_rule:
                return True
    return bool(config.get("cross_seed"))


def procedural_tasks(config: dict) -> list[str]:
    specs = lm_eval_specs(config)
    tasks = config["tasks"]
    return [t for t in tasks["held_in"] + tasks["held_out"] if t not in specs]


def fetched_bases(config: dict) -> list[str]:
    return [b for b, spec in config["bases"].items() if spec["source"] in ("hub", "local")]


def bases_with_fetched_experts(config: dict) -> list[str]:
    return [b for b, spec in config["bases"].items() if spec.get("experts")]


def model_ref(spec: dict) -> dict:
    """The part of a base or expert entry that says where its files are."""
    return {k: spec[k] for k in ("repo", "revision", "path") if k in spec}


def has_multitask(config: dict) -> bool:
    """The multitask reference is trained here when finetune.multitask is configured."""
    return "multitask" in (config.get("finetune") or {})


def _check_ref(ref: dict, key: str) -> None:
    if "path" in ref and "repo" in ref:
        raise SourceConfigError(f"config key {key}: give repo and revision, or path, not both")
    if "repo" in ref and "revision" not in ref:
        raise SourceConfigError(
            f"config key {key}.revision: required with repo (a commit hash pins the files)")
    if "repo" not in ref and "path" not in ref:
        raise SourceConfigError(f"config key {key}: give repo and revision (hub) or path (local)")


def check_sources(config: dict) -> None:
    """Key-naming errors for model sources, expert lists and lm-eval tasks."""
    from mergescale.tasks import get_family

    held_in = config["tasks"]["held_in"]
    specs = lm_eval_specs(config)
    for name in specs:
        try:
            get_family(name)
        except KeyError:
            continue
        raise SourceConfigError(
            f"config key tasks.lm_eval.{name}: also a procedural task family; choose another name")
    train_needed = set()  # tasks with experts fine-tuned here
    for base, spec in config["bases"].items():
        key = f"config key bases.{base}"
        source = spec["source"]
        if source in ("hub", "local"):
            for extra in ("shape", "pretrain"):
                if extra in spec:
                    raise SourceConfigError(f"{key}.{extra}: only for source pretrain")
        if source == "hub":
            for needed in ("repo", "revision"):
                if needed not in spec:
                    raise SourceConfigError(
                        f"{key}.{needed}: required for source hub (a commit hash pins the files)")
            if "path" in spec:
                raise SourceConfigError(f"{key}.path: not used with source hub (use source local)")
        elif source == "local":
            if "path" not in spec:
                raise SourceConfigError(f"{key}.path: required for source local")
            for extra in ("repo", "revision"):
                if extra in spec:
                    raise SourceConfigError(f"{key}.{extra}: not used with source local")
        else:
            for extra in ("repo", "revision", "path"):
                if extra in spec:
                    raise SourceConfigError(f"{key}.{extra}: not used with source {source}")
            if not procedural_tasks(config):
                raise SourceConfigError(
                    f"{key}.source: pretrain needs procedural tasks to pretrain on; every task "
                    "here is an lm-eval task")
        experts = spec.get("experts")
        if experts:
            missing = [t for t in held_in if t not in experts]
            if missing:
                raise SourceConfigError(
                    f"{key}.experts: no expert for held-in task(s) {', '.join(missing)} "
                    "(list every held-in task, or none to fine-tune them all here)")
            for task, ref in experts.items():
                if task not in held_in:
                    raise SourceConfigError(f"{key}.experts.{task}: not a held-in task")
                _check_ref(ref, f"bases.{base}.experts.{task}")
        else:
            train_needed.update(held_in)
    if has_multitask(config):
        train_needed.update(held_in)
    finetune = config.get("finetune") or {}
    if train_needed and "expert" not in finetune and any(not s.get("experts") for s in config["bases"].values()):
        raise SourceConfigError(
            "config key finetune.expert: required (some bases' experts are fine-tuned here; "
            "or give bases.<name>.experts)")
    for task in sorted(train_needed):
        if task in specs and "train" not in specs[task]:
            raise SourceConfigError(
                f"config key tasks.lm_eval.{task}.train: required, experts or the multitask "
                "model are fine-tuned on this task here (name the lm-eval task whose training "
                "split they train on), or give bases.<name>.experts")
    if needs_validation_rows(config):
        for task in held_in:
            if task in specs and not lm_eval_split_tasks(specs[task], "validation"):
                raise SourceConfigError(
                    f"config key tasks.lm_eval.{task}.validation: required, a merge method reads "
                    "validation data (tuning, statistics or a fit); name the lm-eval task(s) whose "
                    "validation split (or a held-back slice of their training split) stands for it")
    if procedural_tasks(config) and "data" not in config:
        raise SourceConfigError("config key data: required for procedural tasks")
