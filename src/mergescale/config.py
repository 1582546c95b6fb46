"""Workflow config checks that a JSON schema cannot express.

The schema (workflow/schemas/config.schema.yaml) rejects unknown keys and wrong types;
these checks need the task and method registries. Every message names the config key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergescale.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def check_schema(config: dict, schema_path: Path = SCHEMA_PATH) -> None:
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {key}: {e.message}")


def check_semantics(config: dict) -> None:
    from mergescale.merge import get_method, validate_params
    from mergescale.merge.errors import MergeInputError
    from mergescale.sources.declared import SourceConfigError, check_sources, lm_eval_specs
    from mergescale.tasks import get_family
    from mergescale.tasks.families import families_with_role

    held_in, held_out = config["tasks"]["held_in"], config["tasks"]["held_out"]
    lm_eval = lm_eval_specs(config)  # tasks named by public lm-eval tasks, not families
    for key, names in (("tasks.held_in", held_in), ("tasks.held_out", held_out)):
        for name in names:
            if name in lm_eval:
                continue
            try:
                family = get_family(name)
            except KeyError as err:
                raise ConfigError(f"config key {key}: {err.args[0]}") from None
            if family.role != "task":  # pretraining and instruction tuning read it
                raise ConfigError(
                    f"config key {key}: {name!r} is a {family.role} family, not a benchmark "
                    f"family; benchmark families: {', '.join(families_with_role('task'))}")
    overlap = sorted(set(held_in) & set(held_out))
    if overlap:
        raise ConfigError(f"config key tasks.held_out: {overlap} are also held-in")
    for k in config["merge"]["ks"]:
        if k > len(held_in):
            raise ConfigError(
                f"config key merge.ks: k={k} experts asked for, but tasks.held_in has only "
                f"{len(held_in)} tasks"
            )
    _check_bases(config["bases"])
    for base, spec in config["bases"].items():
        _check_ks_subset(config, spec.get("ks", []), f"bases.{base}.ks")
    for name, spec in config["merge"]["methods"].items():
        where = f"merge.methods.{name}"
        _check_ks_subset(config, spec.get("ks", []), f"{where}.ks")
        _check_method_bases(config, spec.get("bases", []), f"{where}.bases")
        if "rule" in spec:  # a rule-method: a workflow job of its own
            from mergescale.rule_methods.registry import get_rule_method

            try:
                rule_method = get_rule_method(spec["rule"])
            except MergeInputError as err:
                raise ConfigError(f"config key {where}.rule: {err.args[0]}") from None
            try:
                rule_method.resolve(spec.get("params"), where="params.")
            except MergeInputError as err:
                raise ConfigError(f"config key {where}: {err.args[0]}") from None
            if rule_method.check_config is not None:
                rule_method.check_config(config, name)
            continue
        try:
            method = get_method(spec["method"])
            validate_params(method, spec.get("params"))
            if spec.get("tune"):
                from mergescale.merge.search_space import search_space

                search_space(spec["method"], spec["tune"], spec.get("params"))
        except (KeyError, MergeInputError) as err:
            raise ConfigError(f"config key {where}: {err.args[0]}") from None
    try:
        check_sources(config)
    except SourceConfigError as err:
        raise ConfigError(str(err)) from None


def _check_bases(bases: dict) -> None:
    from mergescale.sources.grid import root_base

    required = {"pretrain": ("shape", "pretrain"), "instruct": ("from", "train"), "variant": ("from",)}
    for base, spec in bases.items():
        for needed in required.get(spec["source"], ()):
            if needed not in spec:
                raise ConfigError(
                    f"config key bases.{base}.{needed}: required for source {spec['source']}")
        if spec["source"] == "pretrain":
            shape = spec["shape"]
            if shape["hidden_size"] % shape["num_attention_heads"]:
                raise ConfigError(
                    f"config key bases.{base}.shape: hidden_size must be divisible by "
                    f"num_attention_heads"
                )
        elif spec["source"] in ("instruct", "variant"):
            for key in ("shape", "pretrain") + (("train",) if spec["source"] == "variant" else ()):
                if key in spec:
                    raise ConfigError(
                        f"config key bases.{base}.{key}: {'an instruct' if spec['source'] == 'instruct' else 'a variant'} "
                        f"base takes its weights from bases.{base}.from")
            if spec["from"] not in bases:
                raise ConfigError(
                    f"config key bases.{base}.from: no base named {spec['from']!r} "
                    f"(bases: {', '.join(bases)})")
            try:
                root_base(bases, base)
            except ValueError as err:
                raise ConfigError(f"config key bases.{base}.from: {err}") from None
        if spec["source"] == "gguf" and "gguf" not in spec:
            raise ConfigError(f"config key bases.{base}.gguf: required for source gguf")
        if spec["source"] == "pretrain" and spec.get("chat_template"):
            raise ConfigError(f"config key bases.{base}.chat_template: a pretrained character-level "
                              f"base has no chat template")
        if spec["source"] == "variant" and spec.get("chat_template", False) != bases[spec["from"]].get(
                "chat_template", False):
            raise ConfigError(f"config key bases.{base}.chat_template: a variant keeps the prompt format "
                              f"of bases.{spec['from']} (chat_template: "
                              f"{str(bases[spec['from']].get('chat_template', False)).lower()})")
        for stage, wrong in (("expert", "steps_per_task"), ("multitask", "steps")):
            if wrong in spec.get("finetune", {}).get(stage, {}):
                raise ConfigError(f"config key bases.{base}.finetune.{stage}.{wrong}: not a setting of "
                                  f"finetune.{stage}")
        if "lora" in spec.get("pretrain", {}):
            raise ConfigError(f"config key bases.{base}.pretrain.lora: LoRA is for fine-tuning only")


def _check_ks_subset(config: dict, ks: list[int], key: str) -> None:
    """A base's or method's own `ks` pick among merge.ks."""
    extra = sorted(set(ks) - set(config["merge"]["ks"]))
    if extra:
        raise ConfigError(f"config key {key}: {extra} not in merge.ks {config['merge']['ks']}")


def _check_method_bases(config: dict, names: list[str], key: str) -> None:
    """A method's `bases` name bases of the grid (the cross-seed study's base_b is not)."""
    grid = [b for b in config["bases"] if b != config.get("cross_seed", {}).get("base_b")]
    unknown = [b for b in names if b not in grid]
    if unknown:
        raise ConfigError(f"config key {key}: {unknown} are not bases of the grid ({', '.join(grid)})")


def load_config(path: Path) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    check_schema(config)
    check_semantics(config)
    return config
