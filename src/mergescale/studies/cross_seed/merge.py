"""Merging experts fine-tuned from two bases pretrained from different seeds.

Experts of base A and of base B live in different bases of weight space (their hidden
units are in unrelated orders), so averaging them directly mixes unrelated units. Three
methods, all uniform averages over the k experts:

- `average`: no alignment (the naive baseline);
- `weight_matching`: B's experts are permuted onto A's (permutations found by weight
  matching the mean of B's experts onto the mean of A's), then averaged;
- `pleas`: weight matching, then PLeaS's per-layer least squares on validation texts.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mergescale.studies.cross_seed.plan import CROSS_SEED_METHODS
from mergescale.merge.in_memory import average_states, write_merged_checkpoint
from mergescale.models.llama import load_model
from mergescale.studies.cross_seed.permutation import apply_permutation, llama_permutation_spec, weight_matching
from mergescale.studies.cross_seed.pleas import least_squares_merge, linear_layer_names
from mergescale.training.loop import collate, encode


def text_batches(tokenizer, rows: list[dict], batch_size: int) -> list[tuple[dict, torch.Tensor]]:
    """Whole texts (prompt + answer) as model inputs, with the padding masked out."""
    encoded = encode(tokenizer, rows, loss_on="all")
    out = []
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], tokenizer.pad_token_id)
        out.append(({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                    batch["attention_mask"].bool()))
    return out


def align(config, reference: dict[str, torch.Tensor], moving: list[dict[str, torch.Tensor]],
          max_iter: int = 100, seed: int = 0, log=None) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Permute every state in `moving` by the permutations that match their mean onto
    `reference`; also returns the permutations."""
    spec = llama_permutation_spec(config, list(reference))
    perms = weight_matching(spec, reference, average_states(moving), max_iter=max_iter, seed=seed, log=log)
    return [apply_permutation(s, spec, perms) for s in moving], perms


def merge_cross_seed(method: str, experts_a: list[Path], experts_b: list[Path], out_dir: Path,
                     rows: list[dict] | None = None, batch_size: int = 64, ridge: float = 1e-4,
                     max_iter: int = 100, seed: int = 0, dtype: str = "float32", log=print) -> dict:
    """Merge experts of base A with experts of base B into `out_dir` (atomically, with a card)."""
    if method not in CROSS_SEED_METHODS:
        raise ValueError(f"cross-seed method {method!r}: expected one of {sorted(CROSS_SEED_METHODS)}")
    if not experts_a or not experts_b:
        raise ValueError("cross-seed merge needs at least one expert of each base")
    start = time.perf_counter()
    loaded_a = [load_model(p) for p in experts_a]
    loaded_b = [load_model(p) for p in experts_b]
    model, tokenizer = loaded_a[0]
    config = model.config
    # copies: loading the merged weights into `model` must not change expert A's state
    states_a = [{k: v.clone() for k, v in m.state_dict().items()} for m, _ in loaded_a]
    states_b = [{k: v.clone() for k, v in m.state_dict().items()} for m, _ in loaded_b]
    perms = None
    if method != "average":
        states_b, perms = align(config, average_states(states_a), states_b, max_iter, seed, log)
    merged = average_states(states_a + states_b)
    model.load_state_dict(merged)
    residuals = None
    if method == "pleas":
        if not rows:
            raise ValueError("pleas needs validation examples (rows)")
        originals = []
        for state in states_a + states_b:
            m, _ = load_model(experts_a[0])
            m.load_state_dict(state)
            originals.append(m.eval())
        model.eval()
        residuals = least_squares_merge(model, originals, linear_layer_names(model),
                                        text_batches(tokenizer, rows, batch_size), ridge, log)
    description, paper = CROSS_SEED_METHODS[method]
    # expert A's first checkpoint gives the config and tokenizer (every expert shares them)
    card = write_merged_checkpoint(model.state_dict(), Path(experts_a[0]), Path(out_dir), {
        "method": f"cross_seed_{method}", "description": description, "paper": paper,
        "params": {"max_iter": max_iter, **({"ridge": ridge, "examples": len(rows or [])}
                                           if method == "pleas" else {})},
        "base": None,
        "experts": [{"path": str(Path(p).resolve()), "params": {"side": side}}
                    for side, paths in (("A", experts_a), ("B", experts_b)) for p in paths],
        "seed": seed,
        "permutation_sizes": {g: len(p) for g, p in perms.items()} if perms else None,
        "pleas_relative_residuals": residuals,
    }, dtype=dtype, started=start)
    log(f"cross-seed {method}: {len(experts_a)} + {len(experts_b)} experts in {card['wall_time_s']:.1f}s")
    return card
