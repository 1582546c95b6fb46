"""Twin-Merging's model as lm-eval sees it: each input is scored by its own routed weights.

Registered with lm-eval as ``mergescale-twin`` when imported; Twin-Merging's
`model_spec.json` names this module, so the evaluator imports it only for such models.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from mergescale.rule_methods.twin_merging import SPEC_MODEL, load_twin


@register_model(SPEC_MODEL)
class TwinMergingLM(HFLM):
    """Twin-Merging (mergescale.rule_methods.twin_merging): each input is scored by its own routed weights."""

    def __init__(self, spec_dir: str, device: str = "cpu", batch_size: int = 64, **kwargs):
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
