"""Merge configuration files: mergekit's YAML, with mergekit's semantics.

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert_a
        parameters: {weight: 1.0, density: [0.2, 0.5]}    # a gradient over the layers
      - model: path/to/expert_b
        parameters:
          weight: [{filter: self_attn, value: 0.5}, {value: 1.0}]   # filtered values
    parameters: {normalize: true, int8_mask: true}   # global; per-expert keys apply to all
    dtype: bfloat16          # mergekit's computation dtype; mergescale computes in float32
    out_dtype: bfloat16      # output dtype (default: dtype, else the base's dtype)
    tokenizer_source: base
    seed: 0                  # mergescale extension (mergekit: --random-seed)

or, instead of `models`, `slices` (layer stacking and per-slice merges):

    slices:
      - sources: [{model: a, layer_range: [0, 16]}, {model: b, layer_range: [0, 16]}]
        parameters: {t: 0.3}                # optional: this slice's settings
        base_model: a                       # optional: this slice's base
      - sources: [{model: b, layer_range: [8, 24]}]   # one source: copied (passthrough)

An entry of `models` naming the base model is the base, not an expert (mergekit's
convention), for methods that use a base; a base not listed is added, and methods that
take no base merge it like any other model (as mergekit does). Model paths are local
directories, relative to the working directory. `int8_mask` is accepted and ignored (a
memory hint in mergekit that changes no result). mergekit features outside this subset
(modules, tokenizer surgery, tokenizer_source other than base, chat templates, LoRA
references) are refused with one line naming the key, never silently ignored.
Semantics: mergescale.merge.layout (slices, precedence) and mergescale.merge.settings
(gradients, filters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergescale.merge.engine import OUTPUT_DTYPES, MergeRequest
from mergescale.merge.errors import MergeInputError
from mergescale.merge.layout import MergeLayout, OutputSlice, Source
from mergescale.merge.registry import MergeMethod, get_method, validate_params
from mergescale.merge.settings import check_setting, is_constant

_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "seed",
             "tokenizer_source"}
_UNSUPPORTED = {
    "modules": "per-module configurations",
    "tokenizer": "tokenizer surgery",
    "chat_template": "chat template selection",
}
_MODEL_KEYS = {"model", "parameters"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
_SLICE_KEYS = {"sources", "base_model", "parameters"}
# mergekit's dtype names (mergekit.common.dtype_from_name) that mergescale writes
_DTYPE_ALIASES = {f"torch.{k}": k for k in OUTPUT_DTYPES}
# Hints mergekit reads that change no result: accepted (and checked) anywhere, then dropped.
_NO_OP_HINTS = {"int8_mask": bool}


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


def _settings(params: Any, key: str) -> dict[str, Any]:
    """A `parameters:` mapping with every setting checked and no-op hints removed."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeInputError(f"{key}: expected a mapping of hyperparameters, got {params!r}")
    out = {}
    for name, value in params.items():
        if name in _NO_OP_HINTS:
            if not isinstance(value, _NO_OP_HINTS[name]):
                raise MergeInputError(f"{key}.{name}: expected true/false, got {value!r}")
            continue
        out[name] = check_setting(value, f"{key}.{name}")
    return out


def _constants(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if is_constant(v)}


def _dtype(data: dict) -> str | None:
    """The output dtype: out_dtype, else dtype (mergekit's computation dtype)."""
    names = {}
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None:
            names[key] = _DTYPE_ALIASES.get(value, value)
            if names[key] not in OUTPUT_DTYPES:
                raise MergeInputError(f"{key}: {value!r} is not one of {sorted(OUTPUT_DTYPES)}")
    return names.get("out_dtype", names.get("dtype"))


def _vocabulary(path: Path) -> Any:
    """A model's token -> id map from tokenizer.json (None: no such file)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    import json

    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise MergeInputError(f"{file}: cannot read the tokenizer ({e})") from None
    added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
    return (data.get("model") or {}).get("vocab"), added


def _check_tokenizers(inputs: list[Path], base: Path) -> None:
    """tokenizer_source: base is the identity only when every model shares the base's
    vocabulary; mergekit would remap embedding rows otherwise, which mergescale does not."""
    ref = _vocabulary(base)
    for path in inputs:
        vocab = _vocabulary(path)
        if ref is not None and vocab is not None and vocab != ref:
            raise MergeInputError(
                f"tokenizer_source: the tokenizer of {path} differs from the base's; remapping "
                "embeddings between vocabularies is not supported")


class _Inputs:
    """Distinct model directories, in order of first mention."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def index(self, path: Path) -> int:
        for i, p in enumerate(self.paths):
            if p.resolve() == path.resolve():
                return i
        self.paths.append(path)
        return len(self.paths) - 1


def _check_counts(method: MergeMethod, n_experts: int, has_base: bool, where: str) -> None:
    if method.needs_base and not has_base:
        raise MergeInputError(f"{where}{method.name} needs a base model (base_model)")
    lo, hi = method.min_experts, method.max_experts
    if n_experts < lo or (hi is not None and n_experts > hi):
        wanted = (f"exactly {lo}" if lo == hi else f"at least {lo}" + (f" and at most {hi}" if hi else ""))
        what = "models besides the base" if has_base else "models"
        raise MergeInputError(f"{where}{method.name} merges {wanted} {what}, got {n_experts}")


def _models_slice(data: dict, method: MergeMethod, base: Path | None, params: dict, inputs: _Inputs) -> OutputSlice:
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergeInputError("models: expected a non-empty list of {model: path, parameters: {...}}")
    base_index = inputs.index(base) if base is not None else None
    sources: list[Source] = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeInputError(f"{key}: expected a mapping with a 'model' key")
        for k in entry:
            if k not in _MODEL_KEYS:
                raise MergeInputError(f"{key}.{k}: unknown key; allowed: model, parameters")
        index = inputs.index(_model_path(entry["model"], f"{key}.model"))
        entry_params = _settings(entry.get("parameters"), f"{key}.parameters")
        if index == base_index and method.uses_base:
            continue  # mergekit lists the base among models; it is not an expert
        if any(s.input == index for s in sources):
            raise MergeInputError(f"{key}.model: {entry['model']!r} is listed twice")
        try:  # fail here, naming the entry of `models`, rather than mid-merge
            validate_params(method, _constants(params), [_constants(entry_params)], n_experts=1)
        except MergeInputError as e:
            raise MergeInputError(str(e).replace("experts[0]", key)) from None
        sources.append(Source(index, None, entry_params))
    if base_index is not None and all(s.input != base_index for s in sources):
        # mergekit adds an unlisted base: as the base, or as one more model to methods without one
        sources.insert(0, Source(base_index, None, {}))
    has_base = base_index is not None and method.uses_base
    _check_counts(method, len(sources) - int(has_base), has_base, "")
    return OutputSlice(tuple(sources), base_index if has_base else None, {})


def _range(value: Any, key: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise MergeInputError(f"{key}: expected [first, end) layer indices, got {value!r}")
    return int(value[0]), int(value[1])


def _slices(data: dict, method: MergeMethod, base: Path | None, params: dict, inputs: _Inputs) -> list[OutputSlice]:
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise MergeInputError("slices: expected a non-empty list of {sources: [...]}")
    out = []
    for i, sl in enumerate(raw):
        key = f"slices[{i}]"
        if not isinstance(sl, dict) or "sources" not in sl:
            raise MergeInputError(f"{key}: expected a mapping with 'sources'")
        for k in sl:
            if k not in _SLICE_KEYS:
                raise MergeInputError(f"{key}.{k}: unknown or unsupported key; allowed: {', '.join(sorted(_SLICE_KEYS))}")
        slice_params = _settings(sl.get("parameters"), f"{key}.parameters")
        slice_base = _model_path(sl["base_model"], f"{key}.base_model") if sl.get("base_model") else base
        if not isinstance(sl["sources"], list) or not sl["sources"]:
            raise MergeInputError(f"{key}.sources: expected a non-empty list of {{model, layer_range}}")
        sources = []
        for j, src in enumerate(sl["sources"]):
            where = f"{key}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise MergeInputError(f"{where}: expected a mapping with 'model' and 'layer_range'")
            for k in src:
                if k not in _SOURCE_KEYS:
                    raise MergeInputError(f"{where}.{k}: unknown key; allowed: {', '.join(sorted(_SOURCE_KEYS))}")
            index = inputs.index(_model_path(src["model"], f"{where}.model"))
            if any(s.input == index for s in sources):
                raise MergeInputError(f"{where}.model: {src['model']!r} appears twice in one slice")
            sources.append(Source(index, _range(src["layer_range"], f"{where}.layer_range"),
                                  _settings(src.get("parameters"), f"{where}.parameters")))
        base_index = None
        if slice_base is not None and method.uses_base:
            base_index = inputs.index(slice_base)
            if all(s.input != base_index for s in sources):
                raise MergeInputError(f"{key}: the base model {str(slice_base)!r} is not among the slice's sources")
        _check_counts(method, len(sources) - int(base_index is not None), base_index is not None, f"{key}: ")
        out.append(OutputSlice(tuple(sources), base_index, slice_params))
    return out


def parse_merge_config(data: Any, out_dir: Path | str, **overrides: Any) -> MergeRequest:
    """Turn a parsed YAML mapping into a validated MergeRequest (with its layout).

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
    if method.needs_data or method.stats:
        raise MergeInputError(f"merge_method: {method.name} reads validation data or statistics, which a "
                              "merge config cannot give; run it from the workflow")

    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source not in ("base", None):
        raise MergeInputError(
            f"tokenizer_source: only 'base' is supported (the output takes the base's tokenizer), got {tokenizer_source!r}"
        )
    base = _model_path(data["base_model"], "base_model") if data.get("base_model") is not None else None
    if tokenizer_source == "base" and base is None:
        raise MergeInputError("tokenizer_source: 'base' needs base_model")
    if ("models" in data) == ("slices" in data):
        raise MergeInputError("models, slices: give exactly one of them")

    params = _settings(data.get("parameters"), "parameters")
    try:  # global keys, before any per-model check
        validate_params(method, _constants(params))
    except MergeInputError as e:
        raise MergeInputError(f"parameters: {e}") from None
    inputs = _Inputs()
    if base is not None:
        inputs.index(base)
    if "slices" in data:
        slices = _slices(data, method, base, params, inputs)
    else:
        slices = [_models_slice(data, method, base, params, inputs)]
    layout = MergeLayout(inputs=inputs.paths, slices=slices, params=params, reference=0)
    if tokenizer_source == "base":
        _check_tokenizers(inputs.paths, base)

    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeInputError(f"seed: expected an integer, got {seed!r}")
    bases = {sl.base for sl in slices if sl.base is not None}
    experts = [p for i, p in enumerate(inputs.paths) if i not in bases]
    expert_params = None  # the constant settings of a `models:` config, for its card
    if "models" in data:
        expert_params = [_constants(s.params) for s in slices[0].sources if s.input != slices[0].base]
    fields: dict[str, Any] = dict(
        method=method.name, base=base if bases else None, experts=experts, out_dir=Path(out_dir),
        params=_constants(params), expert_params=expert_params,
        dtype=_dtype(data), seed=seed, layout=layout,
        card_extra={"merge_config": data},
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
