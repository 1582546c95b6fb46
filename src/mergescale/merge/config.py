"""Merge configuration files: mergekit's YAML for the methods both tools share.

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert_a
        parameters: {weight: 1.0, density: 0.2}
      - model: path/to/expert_b
        parameters: {weight: 0.5, density: 0.2}
    parameters: {normalize: true}      # global; a per-expert key here applies to all experts
    dtype: bfloat16                    # output dtype (we always compute in float32)
    seed: 0                            # mergescale extension (mergekit: --random-seed)

An entry of `models` naming the base model is the base, not an expert (mergekit's
convention), for methods that use a base. Model paths are local directories, relative
to the working directory as in mergekit. mergekit features outside this subset
(slices, per-layer gradients, filtered parameters, tokenizer surgery) are refused with
a message naming the key, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergescale.merge.engine import OUTPUT_DTYPES, MergeRequest
from mergescale.merge.errors import MergeInputError
from mergescale.merge.registry import get_method, validate_params

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed",
             "tokenizer_source"}
_UNSUPPORTED = {
    "slices": "layer slices",
    "modules": "per-module configurations",
    "tokenizer": "tokenizer surgery",
    "chat_template": "chat template selection",
}
_MODEL_KEYS = {"model", "parameters"}


def _model_path(value: Any, key: str) -> Path:
    if isinstance(value, dict) and set(value) == {"model"}:  # mergekit's {model: path} form
        value = value["model"]
    if not isinstance(value, str) or not value:
        raise MergeInputError(f"{key}: expected a model directory path, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise MergeInputError(f"{key}: LoRA references ('model+adapter') are not supported: {value!r}")
    path = Path(value)
    if not path.is_dir():
        raise MergeInputError(f"{key}: {value!r} is not a local model directory")
    return path


def _scalar_params(params: Any, key: str) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeInputError(f"{key}: expected a mapping of hyperparameters, got {params!r}")
    for name, value in params.items():
        if isinstance(value, (list, dict)):
            raise MergeInputError(
                f"{key}.{name}: per-layer gradients and filtered values are not supported; give one number"
            )
    return dict(params)


def parse_merge_config(data: Any, out_dir: Path | str, **overrides: Any) -> MergeRequest:
    """Turn a parsed YAML mapping into a validated MergeRequest.

    `overrides` (device, threads, seed, allow_pickle, ...) are MergeRequest fields set
    from the command line; a seed given there wins over the file's.
    """
    if not isinstance(data, dict):
        raise MergeInputError("merge config: expected a mapping at the top level")
    for key in data:
        if key in _UNSUPPORTED:
            raise MergeInputError(f"{key}: {_UNSUPPORTED[key]} are not supported by mergescale")
        if key not in _TOP_KEYS:
            raise MergeInputError(f"{key}: unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    if "merge_method" not in data:
        raise MergeInputError("merge_method: required")
    method = get_method(str(data["merge_method"]))

    tokenizer_source = data.get("tokenizer_source", "base")
    if tokenizer_source not in ("base", None):
        raise MergeInputError(
            f"tokenizer_source: only 'base' is supported (tokenizer files come from the base), got {tokenizer_source!r}"
        )

    base = _model_path(data["base_model"], "base_model") if data.get("base_model") is not None else None

    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergeInputError("models: expected a non-empty list of {model: path, parameters: {...}}")
    params = _scalar_params(data.get("parameters"), "parameters")
    try:  # global keys, before any per-model check
        validate_params(method, params)
    except MergeInputError as e:
        raise MergeInputError(f"parameters: {e}") from None
    experts: list[Path] = []
    expert_params: list[dict[str, Any]] = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeInputError(f"{key}: expected a mapping with a 'model' key")
        for k in entry:
            if k not in _MODEL_KEYS:
                raise MergeInputError(f"{key}.{k}: unknown key; allowed: model, parameters")
        path = _model_path(entry["model"], f"{key}.model")
        entry_params = _scalar_params(entry.get("parameters"), f"{key}.parameters")
        is_base = base is not None and path.resolve() == base.resolve()
        if is_base and method.uses_base:
            continue  # mergekit lists the base among models; it is not an expert
        try:  # fail here, naming the entry of `models`, rather than mid-merge
            validate_params(method, params, [entry_params], n_experts=1)
        except MergeInputError as e:
            raise MergeInputError(str(e).replace("experts[0]", key)) from None
        experts.append(path)
        expert_params.append(entry_params)

    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise MergeInputError(f"{'out_dtype' if data.get('out_dtype') else 'dtype'}: {dtype!r} is not one of {sorted(OUTPUT_DTYPES)}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeInputError(f"seed: expected an integer, got {seed!r}")

    fields: dict[str, Any] = dict(
        method=method.name, base=base, experts=experts, out_dir=Path(out_dir), params=params,
        expert_params=expert_params, dtype=dtype, seed=seed,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return MergeRequest(**fields)


def load_merge_config(path: Path | str, out_dir: Path | str, **overrides: Any) -> MergeRequest:
    """Read a YAML merge config file into a MergeRequest (see parse_merge_config)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise MergeInputError(f"{path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise MergeInputError(f"{path}: invalid YAML ({e})".replace("\n", " ")) from e
    try:
        return parse_merge_config(data, out_dir, **overrides)
    except MergeInputError as e:
        raise MergeInputError(f"{path}: {e}") from None
