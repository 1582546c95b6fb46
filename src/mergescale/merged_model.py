"""Writing a merged model that a method computed in memory (methods that are rules of
their own): the checkpoint, then the merge card, atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from mergescale.io_utils import atomic_directory
from mergescale.merge import card as card_module
from mergescale.models import save_model


def save_merged(model, tokenizer, out_dir: Path, card: dict, start: float, dtype: str = "float32") -> dict:
    """Save `model` in `dtype` with a merge card: `card` holds method, description, paper,
    params, base, experts and seed; the rest (sizes, versions, time, memory) is added here."""
    model = model.to(getattr(torch, dtype))
    state = model.state_dict()
    with atomic_directory(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        card = {
            **card, "dtype": dtype, "device": "cpu", "threads": torch.get_num_threads(),
            "n_tensors": len(state), "n_parameters": sum(t.numel() for t in state.values()),
            "shards": sorted(p.name for p in tmp.glob("*.safetensors")),
            **card_module.cost(start),
        }
        card_module.write_card(tmp, card)
    return card
