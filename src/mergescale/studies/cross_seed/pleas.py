"""PLeaS: merging with permutations and least squares.

Nasery et al. 2025, "PLeaS: Merging Models with Permutations and Least Squares",
https://arxiv.org/abs/2407.02447

After the models are permuted into one basis (weight matching here), the merged model
starts as their average and then, one linear layer at a time in forward order, its
weights are replaced by the least-squares solution

    W_m = argmin_W  sum_tokens || X_m W^T - (1/k) sum_i X_i W_i^T ||^2

where X_m are the layer's inputs in the merged model (with every earlier layer already
solved) and X_i the same layer's inputs in model i, on the same validation texts. Each
layer thus reproduces, on the merged model's own activations, the average of what the
models' layers output on theirs, so errors do not compound through depth as they do for
a plain average. The paper's partial merging (widening layers) is left out.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

# A batch: forward() keyword arguments, and which positions count (None: all).
Batch = tuple[dict, "torch.Tensor | None"]


def _capture(model: nn.Module, names: list[str], batches: list[Batch], what: str) -> dict[str, torch.Tensor]:
    """Inputs (what='input') or outputs ('output') of the named modules over all batches,
    as [tokens, features] with masked positions dropped."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def make_hook(name):
        def hook(module, args, out):
            t = args[0] if what == "input" else out
            store[name].append(t.detach().reshape(-1, t.shape[-1]))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    masks = []
    try:
        with torch.no_grad():
            for kwargs, mask in batches:
                model(**kwargs)
                if mask is not None:
                    masks.append(mask.reshape(-1).bool())
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        if len(store[n]) != len(batches):
            raise RuntimeError(f"module {n!r} ran {len(store[n])} times for {len(batches)} batches")
        x = torch.cat(store[n])
        out[n] = x[torch.cat(masks)] if masks else x
    return out


def solve_least_squares(x: torch.Tensor, y: torch.Tensor, bias: bool, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W (and b) minimising ||x W^T + b - y||^2 + ridge * mean(diag(x^T x)) ||W||^2, in float64."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if bias:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    gram = x.T @ x
    if ridge > 0:
        gram += torch.eye(len(gram), dtype=torch.float64) * (ridge * gram.diagonal().mean())
    solution = torch.linalg.lstsq(gram, x.T @ y).solution  # [in(+1), out]
    if bias:
        return solution[:-1].T, solution[-1]
    return solution.T, None


def least_squares_merge(merged: nn.Module, models: list[nn.Module], layer_names: list[str],
                        batches: list[Batch], ridge: float = 1e-4,
                        log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Replace each named nn.Linear of `merged` (in the given, forward order) by PLeaS's
    least-squares solution; `models` are already permuted into `merged`'s basis.
    Returns the relative residual of each layer's fit."""
    for name in layer_names:
        if not isinstance(merged.get_submodule(name), nn.Linear):
            raise TypeError(f"PLeaS: module {name!r} is not an nn.Linear")
    targets: dict[str, torch.Tensor] | None = None
    for model in models:  # the models never change: their layer outputs are taken once
        outputs = _capture(model, layer_names, batches, "output")
        targets = outputs if targets is None else {n: targets[n] + outputs[n] for n in layer_names}
    assert targets is not None
    residuals = {}
    for name in layer_names:
        layer = merged.get_submodule(name)
        x = _capture(merged, [name], batches, "input")[name]
        y = targets[name] / len(models)
        weight, bias = solve_least_squares(x, y, layer.bias is not None, ridge)
        with torch.no_grad():
            layer.weight.copy_(weight.to(layer.weight.dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(layer.bias.dtype))
            fit = x.to(torch.float64) @ weight.T + (0 if bias is None else bias)
            residuals[name] = float((fit - y).norm() / y.norm().clamp_min(1e-12))
        if log is not None:
            log(f"PLeaS {name}: {len(x)} tokens, relative residual {residuals[name]:.4f}")
    return residuals


def linear_layer_names(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Every nn.Linear in registration order (the forward order of a Llama)."""
    skip = set(skip)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
