"""LoRA experts (peft): train low-rank adapters, then fold them into the weights.

Merging happens on full weights: an adapter is merged into its base (W + alpha/r * B A)
before any merge method sees it, so every registered method works on LoRA experts
unchanged. The adapter is saved next to the merged weights (``adapter/``); LoRA-LEGO
(mergescale.rule_methods.lora_lego, a rule-method) merges in adapter space from it. For linear methods the two coincide: a weighted sum of the folded deltas
equals the weighted sum of the adapters' products.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Attention and MLP projections of Llama-architecture models.
    target_modules: tuple[str, ...] = field(default=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA settings out of range: r={self.r}, alpha={self.alpha}, "
                             f"dropout={self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty")

    @classmethod
    def from_config(cls, cfg: dict) -> LoraSpec:
        cfg = dict(cfg)
        if "target_modules" in cfg:
            cfg["target_modules"] = tuple(cfg["target_modules"])
        return cls(**cfg)


def add_lora(model: torch.nn.Module, spec: LoraSpec, seed: int = 0):
    """Wrap ``model`` with fresh LoRA adapters; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(spec.target_modules) - present)
    if missing:
        raise ValueError(f"LoRA target_modules not in the model: {missing}")
    torch.manual_seed(seed)  # A is random, B zero: the seed fixes the adapter's start
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def fold_lora(peft_model, adapter_dir=None) -> torch.nn.Module:
    """Optionally save the adapter, then return the base model with it merged in."""
    if adapter_dir is not None:
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return peft_model.merge_and_unload()


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
