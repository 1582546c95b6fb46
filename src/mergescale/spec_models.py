"""Models that are not one static checkpoint, evaluated by lm-eval through registered classes.

A rule-method may write, instead of a Hugging Face checkpoint, a directory with
`model_spec.json`:

    {"model": "<name registered with lm-eval>", "model_args": {...}, "module": "<optional>"}

The evaluation step (mergescale.evaluate) then builds `get_model(model)(spec_dir=<dir>,
device=..., batch_size=..., **model_args)`. Classes registered here are always available;
`module` names a module to import first, for classes registered elsewhere.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from lm_eval.api.registry import get_model, register_model
from lm_eval.models.huggingface import HFLM

SPEC_NAME = "model_spec.json"


def write_spec(out_dir: Path, model: str, model_args: dict | None = None, module: str | None = None) -> None:
    spec = {"model": model, "model_args": model_args or {}}
    if module:
        spec["module"] = module
    (Path(out_dir) / SPEC_NAME).write_text(json.dumps(spec, indent=2) + "\n")


def load_spec_model(spec_dir: Path, device: str = "cpu", batch_size: int = 64):
    """The lm-eval model that `spec_dir/model_spec.json` names, built from that directory."""
    path = Path(spec_dir) / SPEC_NAME
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise ValueError(f"{path}: expected an object with a string key 'model'")
    unknown = set(spec) - {"model", "model_args", "module"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: model, model_args, module")
    args = spec.get("model_args", {})
    if not isinstance(args, dict):
        raise ValueError(f"{path}: 'model_args' must be an object, got {args!r}")
    if spec.get("module"):
        importlib.import_module(spec["module"])
    try:
        cls = get_model(spec["model"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: model {spec['model']!r} is not registered with lm-eval ({err})") from None
    return cls(spec_dir=str(spec_dir), device=device, batch_size=batch_size, **args)


@register_model("mergescale-twin")
class TwinMergingLM(HFLM):
    """Twin-Merging (mergescale.twin_merging): each input is scored by its own routed weights."""

    def __init__(self, spec_dir: str, device: str = "cpu", batch_size: int = 64, **kwargs):
        from mergescale.twin_merging import load_twin

        self.twin = load_twin(Path(spec_dir), device=device)
        super().__init__(pretrained=self.twin.model, tokenizer=self.twin.tokenizer,
                         batch_size=batch_size, **kwargs)

    def _mask(self, ids):
        return (ids != self.tokenizer.pad_token_id).long()

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self.twin.per_input(inps, self._mask(inps)):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        with self.twin.per_input(context, mask if mask is not None else self._mask(context)):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
