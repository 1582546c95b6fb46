"""Sparse Model Soups: prune, retrain several copies, average them; repeat.

Zimmer, Spiegel & Pokutta 2024 (ICLR), https://arxiv.org/abs/2306.16788. One cycle of
iterative magnitude pruning (IMP), explored with m copies:

1. prune the start model (cycle 1: the dense expert; later: the previous cycle's soup)
   to the cycle's target sparsity by weight magnitude;
2. retrain m copies of the pruned model on the task's training split, each with its own
   seed (data order) and optionally learning rate, pruned weights held at exactly zero;
3. average the copies (the uniform soup). They share one mask, so the soup has exactly
   the same zeros: averaging does not lose sparsity. The next cycle starts from it.

IMP's usual output, the best single retrained copy, is kept beside the soup: best by
answer loss on the task's validation split (the paper picks its best candidate on
held-out validation data too).

Prunable tensors: the weight matrices of the Linear layers (in a Llama, attention
q/k/v/o and MLP gate/up/down projections). Embeddings, the output head, norms and
biases stay dense, as is usual when pruning transformers. Selection is global (one
magnitude threshold over every prunable tensor, IMP's criterion, which Zimmer et al.
use) or per layer (each tensor pruned to the target sparsity).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from mergescale.studies.cross_seed.barrier import mean_loss
from mergescale.io_utils import atomic_directory, atomic_write_json
from mergescale.merge.in_memory import average_states
from mergescale.models.llama import load_model, save_model
from mergescale.training.loop import TrainConfig, train

SCOPES = ("global", "layer")
CARD = "training_card.json"


def prunable_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the weight matrices of every Linear layer except the output head."""
    head = model.get_output_embeddings()
    names = [f"{name}.weight" for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head]
    if not names:
        raise ValueError(f"{type(model).__name__}: no Linear layers to prune")
    return names


def _n_pruned(sparsity: float, n: int) -> int:
    return int(math.floor(sparsity * n + 0.5))  # nearest count, halves up


def _keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where kept: exactly round(sparsity * n) of the smallest scores pruned. A
    stable sort breaks ties by position, so ties never change the count; entries
    already at zero (pruned by an earlier cycle) have the smallest score and go first."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[: _n_pruned(sparsity, scores.numel())]] = False
    return keep


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float,
                    scope: str = "global") -> dict[str, torch.Tensor]:
    """{tensor name: bool mask, True = kept} pruning the smallest |w| to `sparsity`:
    over all the tensors at once (`global`) or each tensor on its own (`layer`)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity} is not in [0, 1)")
    if scope not in SCOPES:
        raise ValueError(f"pruning scope {scope!r}: expected one of {SCOPES}")
    scores = {}
    for name, w in weights.items():
        if not torch.isfinite(w).all():
            raise ValueError(f"tensor {name!r}: NaN/Inf values; cannot rank weights by magnitude")
        scores[name] = w.detach().abs().flatten().float().cpu()
    if scope == "layer":
        return {n: _keep_mask(s, sparsity).view(weights[n].shape) for n, s in scores.items()}
    keep = _keep_mask(torch.cat(list(scores.values())), sparsity)
    parts = keep.split([s.numel() for s in scores.values()])
    return {n: part.view(weights[n].shape) for n, part in zip(scores, parts)}


def sparsity_of(state: Mapping[str, torch.Tensor], names: list[str]) -> float:
    """Measured fraction of exact zeros over the named tensors."""
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros / sum(state[n].numel() for n in names)


def apply_masks(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            state[name].mul_(mask.to(state[name].device, state[name].dtype))


class MaskKeeper:
    """Keeps a model's pruned weights at exactly zero while it trains: their gradients are
    zeroed before clipping and the optimiser step (so clipping sees only live weights and
    Adam's moments stay zero there), and the mask is re-applied after every step."""

    def __init__(self, model: torch.nn.Module, masks: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = sorted(set(masks) - set(params))
        if missing:
            raise ValueError(f"mask for tensor {missing[0]!r}, which the model does not have")
        self.pairs = [(params[n], m.to(params[n].device, params[n].dtype)) for n, m in masks.items()]

    def mask_grads(self) -> None:
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    def apply(self) -> None:
        with torch.no_grad():
            for p, m in self.pairs:
                p.mul_(m)


def uniform_soup(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Entry-wise mean of models of one architecture (in float32, cast back)."""
    mean = average_states(states)
    return {name: t.to(states[0][name].dtype) for name, t in mean.items()}


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}


def retrain_copies(model, tokenizer, task: str, train_rows: list[dict], val_rows: list[dict],
                   masks: Mapping[str, torch.Tensor], settings: list[dict], *, chat_template: bool = False,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Retrain one copy per entry of `settings` (TrainConfig fields) from the model's
    current, pruned weights, masks kept; each copy's state and validation answer loss."""
    pruned = clone_state(model)
    copies = []
    for i, spec in enumerate(settings):
        model.load_state_dict(pruned)
        keeper = MaskKeeper(model, masks)
        cfg = TrainConfig(loss_on="answer", chat_template=chat_template, **spec)
        log(f"copy {i}: seed {cfg.seed}, lr {cfg.lr:g}, {cfg.steps} steps")
        summary = train(model, tokenizer, {task: train_rows}, cfg, log=log,
                        after_backward=keeper.mask_grads, after_step=keeper.apply)
        loss = mean_loss(model, tokenizer, val_rows, "answer", chat_template=chat_template)
        log(f"copy {i}: validation answer loss {loss:.4f}")
        copies.append({"state": clone_state(model), "seed": cfg.seed, "lr": cfg.lr, "steps": cfg.steps,
                       "validation_loss": loss, "final_train_loss": summary["final_loss"],
                       "train_seconds": summary["train_seconds"]})
    return copies


def _save(model, tokenizer, state, out_dir: Path, card: dict) -> None:
    model.load_state_dict(state)
    with atomic_directory(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        atomic_write_json(tmp / CARD, card)


def run_cycle(start_dir: Path, task: str, train_rows: list[dict], val_rows: list[dict], *,
              sparsity: float, settings: list[dict], soup_dir: Path, best_dir: Path, card_path: Path,
              cycle: int = 1, scope: str = "global", chat_template: bool = False,
              score_copies: Callable[[list[tuple[str, dict]]], list[list[dict]]] | None = None,
              log: Callable[[str], None] = print) -> dict:
    """One prune-retrain-average cycle from `start_dir`: writes the soup and the best
    copy (checkpoints with a training card) and the cycle card; returns the card.

    `score_copies`, given [(name, state)], returns each copy's test scores (lm-eval rows):
    the mean over copies is reported beside the soup and the best copy."""
    from mergescale.training.stages import train_device

    start = time.perf_counter()
    if not val_rows:
        raise ValueError(f"task {task!r}: no validation examples to pick the best copy with")
    model, tokenizer = load_model(start_dir)
    model.to(train_device())
    names = prunable_tensors(model)
    params = dict(model.named_parameters())
    start_sparsity = sparsity_of(params, names)
    if start_sparsity > sparsity:
        raise ValueError(f"{start_dir}: already {start_sparsity:.4f} sparse, above this cycle's "
                         f"target {sparsity}; sparsities must grow from cycle to cycle")
    try:
        masks = magnitude_masks({n: params[n] for n in names}, sparsity, scope)
    except ValueError as err:
        raise ValueError(f"{start_dir}: {err}") from None
    apply_masks(params, masks)
    mask_sparsity = sparsity_of(params, names)
    pruned_loss = mean_loss(model, tokenizer, val_rows, "answer", chat_template=chat_template)
    log(f"cycle {cycle}: pruned {start_dir} to {mask_sparsity:.4f} ({scope}) over {len(names)} "
        f"tensors; validation answer loss {pruned_loss:.4f} before retraining")
    copies = retrain_copies(model, tokenizer, task, train_rows, val_rows, masks, settings,
                            chat_template=chat_template, log=log)
    soup = uniform_soup([c["state"] for c in copies])
    model.load_state_dict(soup)
    soup_loss = mean_loss(model, tokenizer, val_rows, "answer", chat_template=chat_template)
    best = min(range(len(copies)), key=lambda i: copies[i]["validation_loss"])
    measured = {"soup": sparsity_of(soup, names), "best_copy": sparsity_of(copies[best]["state"], names)}
    for what, value in measured.items():
        if value < mask_sparsity:  # the shared mask must survive retraining and averaging
            raise RuntimeError(f"cycle {cycle}: the {what} is {value:.6f} sparse, below the mask's "
                               f"{mask_sparsity:.6f}")
    log(f"cycle {cycle}: soup validation loss {soup_loss:.4f}; best copy {best} "
        f"({copies[best]['validation_loss']:.4f})")
    if score_copies is not None:
        scored = score_copies([(f"copy{i}", c["state"]) for i, c in enumerate(copies)])
        for c, rows in zip(copies, scored):
            c["test"] = {r["task"]: r["value"] for r in rows}
    common = {"cycle": cycle, "task": task, "start": str(start_dir), "scope": scope,
              "target_sparsity": sparsity, "paper": "https://arxiv.org/abs/2306.16788"}
    model.to("cpu")
    _save(model, tokenizer, soup, soup_dir, {
        **common, "stage": "sparse_soup", "sparsity": measured["soup"], "validation_loss": soup_loss,
        "copies": len(copies)})
    _save(model, tokenizer, copies[best]["state"], best_dir, {
        **common, "stage": "sparse_best_copy", "sparsity": measured["best_copy"],
        "validation_loss": copies[best]["validation_loss"], "copy": best,
        "seed": copies[best]["seed"], "lr": copies[best]["lr"]})
    card = {
        **common, "stage": "sparse_soup_cycle", "start_sparsity": start_sparsity,
        "prunable_tensors": names, "prunable_parameters": sum(params[n].numel() for n in names),
        "parameters": sum(p.numel() for p in params.values()),
        "sparsity": {"mask": mask_sparsity, **measured},
        "validation_examples": len(val_rows),
        "validation_loss": {"pruned": pruned_loss, "soup": soup_loss,
                            "best_copy": copies[best]["validation_loss"]},
        "best_copy": best,
        "copies": [{k: v for k, v in c.items() if k != "state"} for c in copies],
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(Path(card_path), card)
    return card


def copy_scorer(reference_dir: Path, task_dir: Path, task: str, split: str = "test", *,
                batch_size: int = 64, limit: int | None = None, seed: int = 0,
                log: Callable[[str], None] = print) -> Callable[[list[tuple[str, dict]]], list[list[dict]]]:
    """score([(name, state)]) -> each state's lm-eval rows on `task`'s `split`, scored in
    this process (one lm-eval session; the same scores as the evaluate rule's)."""
    from mergescale.evaluate.harness import BatchEvaluator, Candidate

    def score(named_states: list[tuple[str, dict]]) -> list[list[dict]]:
        evaluator = BatchEvaluator(Path(reference_dir), Path(task_dir), device="auto",
                                   batch_size=batch_size, limit=limit, seed=seed, log=log)
        candidates = [Candidate(name, state, ((task, split),)) for name, state in named_states]
        return [result["scores"] for _, result in evaluator.score(candidates)]

    return score
