"""The output ensemble (mergescale.evaluate.ensemble) as an lm-eval model, so that it is scored
by the same harness, tasks and filters as every checkpoint. Imported by the evaluator
when a model spec names it."""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from mergescale.evaluate.ensemble import OutputEnsemble
from mergescale.models.llama import load_model


@register_model("mergescale-ensemble")
class EnsembleLM(HFLM):
    """lm-eval's HF model with the members' averaged distribution in place of one model."""

    def __init__(self, spec_dir: str, members: list[str], device: str = "cpu",
                 batch_size: int = 64, **kwargs):
        loaded = [load_model(m) for m in members]
        self.ensemble = OutputEnsemble([model.eval() for model, _ in loaded]).to(device)
        super().__init__(pretrained=loaded[0][0], tokenizer=loaded[0][1], device=device,
                         batch_size=batch_size, **kwargs)

    def _model_call(self, inps, attn_mask=None, labels=None):
        # log of the mean probability: lm-eval's log_softmax leaves it unchanged
        return self.ensemble.log_probs(inps)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        if mask is None:
            mask = (context != self.tokenizer.pad_token_id).long()
        stop_ids = {self.tokenizer.eos_token_id}
        for text in stop:  # single-token stop sequences (our tasks stop at "\n")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                stop_ids.add(ids[0])
        return self.ensemble.greedy_generate(
            context, mask, max_length - context.shape[1], stop_ids, self.tokenizer.pad_token_id)
