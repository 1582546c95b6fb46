"""Workflow config checks that a JSON schema cannot express.

The schema (workflow/schemas/config.schema.yaml) rejects unknown keys and wrong types;
these checks need the task and method registries. Every message names the config key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


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
    from mergescale.tasks import get_family

    held_in, held_out = config["tasks"]["held_in"], config["tasks"]["held_out"]
    for key, names in (("tasks.held_in", held_in), ("tasks.held_out", held_out)):
        for name in names:
            try:
                get_family(name)
            except KeyError as err:
                raise ConfigError(f"config key {key}: {err.args[0]}") from None
    overlap = sorted(set(held_in) & set(held_out))
    if overlap:
        raise ConfigError(f"config key tasks.held_out: {overlap} are also held-in")
    for k in config["merge"]["ks"]:
        if k > len(held_in):
            raise ConfigError(
                f"config key merge.ks: k={k} experts asked for, but tasks.held_in has only "
                f"{len(held_in)} tasks"
            )
    for base, spec in config["bases"].items():
        if spec["source"] == "pretrain":
            for needed in ("shape", "pretrain"):
                if needed not in spec:
                    raise ConfigError(f"config key bases.{base}.{needed}: required for source pretrain")
            shape = spec["shape"]
            if shape["hidden_size"] % shape["num_attention_heads"]:
                raise ConfigError(
                    f"config key bases.{base}.shape: hidden_size must be divisible by "
                    f"num_attention_heads"
                )
        if spec["source"] == "gguf" and "gguf" not in spec:
            raise ConfigError(f"config key bases.{base}.gguf: required for source gguf")
        if spec["source"] == "pretrain" and spec.get("chat_template"):
            raise ConfigError(f"config key bases.{base}.chat_template: a pretrained character-level "
                              f"base has no chat template")
        if "lora" in spec.get("pretrain", {}):
            raise ConfigError(f"config key bases.{base}.pretrain.lora: LoRA is for fine-tuning only")
    for name, spec in config["merge"]["methods"].items():
        where = f"merge.methods.{name}"
        try:
            method = get_method(spec["method"])
            validate_params(method, spec.get("params"))
        except (KeyError, MergeInputError) as err:
            raise ConfigError(f"config key {where}: {err.args[0]}") from None


def load_config(path: Path) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    check_schema(config)
    check_semantics(config)
    return config
