"""Permutation symmetries of a Llama and weight matching (Git Re-Basin).

Ainsworth et al. 2023, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
https://arxiv.org/abs/2209.04836 (weight matching, Algorithm 1).

A Llama computes the same function after any of these permutations:
- the residual stream (one permutation `res` of the hidden units, shared by every layer):
  columns of embed_tokens and lm_head, inputs of q/k/v/gate/up, outputs of o/down, and
  the RMSNorm weights. RMSNorm divides by the root mean square of the whole vector,
  which no permutation changes, and then scales elementwise, so permuting its weight
  with the stream keeps it exact;
- per layer, the MLP hidden units (`mlp.{i}`): rows of gate/up, columns of down;
- per layer, the attention heads (`heads.{i}`) as whole heads: rows of q/k/v, columns of
  o. Never dimensions within a head: RoPE rotates pairs of dimensions (d, d + head_dim/2)
  by position, so only whole heads are free. With grouped-query attention a key/value
  head moves together with its group of query heads (the unit is the kv group).

A permutation `perm` of a group maps unit j of the permuted model to unit perm[j] of the
original (``new = old.index_select(axis, perm)``); weight matching returns the
permutations that bring model B onto model A in this sense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class PermutationSpecError(ValueError):
    pass


@dataclass(frozen=True)
class PermutedAxis:
    tensor: str
    axis: int
    block: int  # consecutive entries that move together (1: a unit; head_dim: a head)


@dataclass
class PermutationSpec:
    sizes: dict[str, int] = field(default_factory=dict)  # group -> number of units
    axes: dict[str, list[PermutedAxis]] = field(default_factory=dict)  # group -> where it acts

    def add(self, group: str, size: int, tensor: str, axis: int, block: int = 1) -> None:
        if self.sizes.setdefault(group, size) != size:
            raise PermutationSpecError(f"group {group!r}: size {size} != {self.sizes[group]}")
        self.axes.setdefault(group, []).append(PermutedAxis(tensor, axis, block))

    def by_tensor(self) -> dict[str, list[tuple[str, PermutedAxis]]]:
        out: dict[str, list[tuple[str, PermutedAxis]]] = {}
        for group, axes in self.axes.items():
            for ax in axes:
                out.setdefault(ax.tensor, []).append((group, ax))
        return out


def _config_value(config, key, default=None):
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    return default if value is None else value


def llama_permutation_spec(config, names: list[str]) -> PermutationSpec:
    """The spec of a LlamaForCausalLM with these tensor names; an unknown tensor is an error."""
    hidden = _config_value(config, "hidden_size")
    layers = _config_value(config, "num_hidden_layers")
    heads = _config_value(config, "num_attention_heads")
    kv_heads = _config_value(config, "num_key_value_heads", heads)
    head_dim = _config_value(config, "head_dim", hidden // heads)
    inter = _config_value(config, "intermediate_size")
    group = heads // kv_heads  # query heads per key/value head
    spec = PermutationSpec()
    spec.add("res", hidden, "model.embed_tokens.weight", 1)
    spec.add("res", hidden, "model.norm.weight", 0)
    spec.add("res", hidden, "lm_head.weight", 1)
    for i in range(layers):
        p = f"model.layers.{i}."
        h, m = f"heads.{i}", f"mlp.{i}"
        spec.add("res", hidden, p + "input_layernorm.weight", 0)
        spec.add("res", hidden, p + "post_attention_layernorm.weight", 0)
        for proj, block in (("q_proj", group * head_dim), ("k_proj", head_dim), ("v_proj", head_dim)):
            spec.add(h, kv_heads, p + f"self_attn.{proj}.weight", 0, block)
            spec.add("res", hidden, p + f"self_attn.{proj}.weight", 1)
            spec.add(h, kv_heads, p + f"self_attn.{proj}.bias", 0, block)
        spec.add("res", hidden, p + "self_attn.o_proj.weight", 0)
        spec.add(h, kv_heads, p + "self_attn.o_proj.weight", 1, group * head_dim)
        spec.add("res", hidden, p + "self_attn.o_proj.bias", 0)
        for proj in ("gate_proj", "up_proj"):
            spec.add(m, inter, p + f"mlp.{proj}.weight", 0)
            spec.add("res", hidden, p + f"mlp.{proj}.weight", 1)
            spec.add(m, inter, p + f"mlp.{proj}.bias", 0)
        spec.add("res", hidden, p + "mlp.down_proj.weight", 0)
        spec.add(m, inter, p + "mlp.down_proj.weight", 1)
        spec.add("res", hidden, p + "mlp.down_proj.bias", 0)
    covered = spec.by_tensor()
    unknown = sorted(set(names) - set(covered))
    if unknown:
        raise PermutationSpecError(
            f"tensor {unknown[0]!r} is not part of the Llama permutation spec "
            f"({len(unknown)} unknown tensor(s)); only LlamaForCausalLM checkpoints are supported"
        )
    # Drop optional tensors (biases) the checkpoint does not have.
    present = set(names)
    spec.axes = {g: [a for a in axes if a.tensor in present] for g, axes in spec.axes.items()}
    return spec


def _expand(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Unit permutation -> index over entries, moving blocks of `block` entries together."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def _check_axis(tensor: torch.Tensor, ax: PermutedAxis, size: int) -> None:
    if tensor.dim() <= ax.axis or tensor.shape[ax.axis] != size * ax.block:
        raise PermutationSpecError(
            f"tensor {ax.tensor!r} has shape {list(tensor.shape)}; expected {size * ax.block} "
            f"entries on axis {ax.axis}"
        )


def permute_tensor(spec: PermutationSpec, name: str, tensor: torch.Tensor,
                   perms: dict[str, torch.Tensor], skip_axis: int | None = None) -> torch.Tensor:
    for group, ax in spec.by_tensor().get(name, []):
        if ax.axis == skip_axis:
            continue
        _check_axis(tensor, ax, spec.sizes[group])
        tensor = tensor.index_select(ax.axis, _expand(perms[group], ax.block))
    return tensor


def apply_permutation(state: dict[str, torch.Tensor], spec: PermutationSpec,
                      perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every tensor permuted; tensors outside the spec are kept."""
    missing = sorted(set(spec.sizes) - set(perms))
    if missing:
        raise PermutationSpecError(f"no permutation given for group(s) {missing}")
    for group, perm in perms.items():
        if sorted(perm.tolist()) != list(range(spec.sizes[group])):
            raise PermutationSpecError(f"perms[{group!r}] is not a permutation of {spec.sizes[group]} units")
    return {name: permute_tensor(spec, name, t, perms) for name, t in state.items()}


def identity_perms(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_perms(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}


def inverse(perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {g: torch.argsort(p) for g, p in perms.items()}


def _unit_rows(tensor: torch.Tensor, ax: PermutedAxis, size: int) -> torch.Tensor:
    """[size, everything else]: one row per unit of the axis (a block's entries side by side)."""
    return tensor.movedim(ax.axis, 0).reshape(size, -1)


def weight_matching(spec: PermutationSpec, state_a: dict[str, torch.Tensor],
                    state_b: dict[str, torch.Tensor], max_iter: int = 100, seed: int = 0,
                    log=None) -> dict[str, torch.Tensor]:
    """Permutations of B maximising sum_tensors <W_a, permuted W_b> (coordinate descent).

    Each step fixes all groups but one; the best permutation of that group is then a
    linear assignment problem over the similarity of A's units with B's units, summed over
    every tensor axis the group acts on (Ainsworth et al., Algorithm 1). Stops when a sweep
    over all groups (in a seeded random order) improves nothing.
    """
    for name, ax_list in spec.by_tensor().items():
        for who, state in (("A", state_a), ("B", state_b)):
            if name not in state:
                raise PermutationSpecError(f"model {who} has no tensor {name!r}")
            for group, ax in ax_list:
                _check_axis(state[name], ax, spec.sizes[group])
    a = {k: v.to(torch.float64) for k, v in state_a.items()}
    b = {k: v.to(torch.float64) for k, v in state_b.items()}
    perms = identity_perms(spec)
    rng = np.random.default_rng(seed)
    groups = sorted(spec.sizes)
    for iteration in range(max_iter):
        progress = False
        for i in rng.permutation(len(groups)):
            group = groups[i]
            n = spec.sizes[group]
            sim = torch.zeros(n, n, dtype=torch.float64)
            for ax in spec.axes[group]:
                w_b = permute_tensor(spec, ax.tensor, b[ax.tensor], perms, skip_axis=ax.axis)
                sim += _unit_rows(a[ax.tensor], ax, n) @ _unit_rows(w_b, ax, n).T
            _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
            cols = torch.as_tensor(cols, dtype=torch.long)
            old = sim[torch.arange(n), perms[group]].sum().item()
            new = sim[torch.arange(n), cols].sum().item()
            if new > old + 1e-12 * max(1.0, abs(old)):
                progress = True
            perms[group] = cols
        if log is not None:
            log(f"weight matching: sweep {iteration + 1}, progress={progress}")
        if not progress:
            break
    return perms


def match_state(config, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                max_iter: int = 100, seed: int = 0, log=None) -> dict[str, torch.Tensor]:
    """Model B's state permuted onto model A (both LlamaForCausalLM state dicts)."""
    spec = llama_permutation_spec(config, list(state_b))
    perms = weight_matching(spec, state_a, state_b, max_iter=max_iter, seed=seed, log=log)
    return apply_permutation(state_b, spec, perms)
