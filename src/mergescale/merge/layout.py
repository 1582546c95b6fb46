"""Which input tensors make each output tensor: mergekit's slices, layer by layer.

A merge config names input models and, optionally, `slices`: each output slice stacks
layers taken from the same layer range of each of its sources, merged with the config's
method (one source: copied, the passthrough idiom for layer stacking). Output layers are
numbered consecutively over the slices, so the output may have more or fewer layers than
any input. Tensors outside the transformer blocks follow mergekit: embeddings ("pre"
weights, every name with "embed") come from the first slice's sources, the rest (final
norm, output head) from the last slice's.

A `models:` config is one slice over all layers of every model. Parameters may be
gradients or filtered values (mergescale.merge.settings), resolved per tensor with
mergekit's precedence: the source's own parameters, then the slice's, then the global
ones. Values for the whole merge are checked per tensor when the layout is expanded,
before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergescale.merge.errors import MergeInputError
from mergescale.merge.ops import layer_index, with_layer_index
from mergescale.merge.registry import MergeMethod, ResolvedParams, validate_params
from mergescale.merge.settings import resolve

@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name and (input index, input tensor name) per input, the
    base first when `has_base`; params/expert_params resolved for this tensor (None: the
    merge's own)."""

    name: str
    sources: tuple[tuple[int, str], ...]
    has_base: bool
    params: dict[str, Any] | None = None
    expert_params: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Source:
    input: int  # index into MergeLayout.inputs
    layer_range: tuple[int, int] | None  # None: every layer of the model
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[Source, ...]
    base: int | None  # index into MergeLayout.inputs of the slice's base (among its sources)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeLayout:
    inputs: list[Path]
    slices: list[OutputSlice]
    params: dict[str, Any]  # global settings
    reference: int  # the input whose config.json and tokenizer the output takes

    def expand(self, method: MergeMethod, checkpoints: list) -> tuple[list[TensorJob], int | None]:
        """Every output tensor's job, and the output's layer count (None: no blocks)."""
        layers = [_layer_names(c) for c in checkpoints]
        resolver = _Resolver(method, self.params)
        jobs: list[TensorJob] = []
        ranges = [self._ranges(s, i, layers) for i, s in enumerate(self.slices)]

        def outside(sl: OutputSlice, names: list[str]) -> None:
            for name in names:
                srcs = [(s, name) for s in sl.sources]
                jobs.append(resolver.job(sl, srcs, name, 0.0))

        first = self.slices[0].sources[0].input
        outside(self.slices[0], [n for n in layers[first][0] if "embed" in n])
        out_layer = 0
        for sl, rng in zip(self.slices, ranges):
            n = rng[0][1] - rng[0][0]
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                lead_layer = rng[0][0] + offset
                for name in layers[sl.sources[0].input][1].get(lead_layer, []):
                    srcs = [(s, with_layer_index(name, r[0] + offset)) for s, r in zip(sl.sources, rng)]
                    jobs.append(resolver.job(sl, srcs, with_layer_index(name, out_layer), t))
                out_layer += 1
        last = self.slices[-1].sources[0].input
        outside(self.slices[-1], [n for n in layers[last][0] if "embed" not in n])
        has_blocks = any(layers[c][1] for c in range(len(checkpoints)))
        return jobs, (out_layer if has_blocks else None)

    def _ranges(self, sl: OutputSlice, i: int, layers) -> list[tuple[int, int]]:
        out = []
        for j, s in enumerate(sl.sources):
            count = len(layers[s.input][1])
            lo, hi = s.layer_range if s.layer_range is not None else (0, count)
            if not 0 <= lo < hi <= count:
                raise MergeInputError(
                    f"slices[{i}].sources[{j}].layer_range: [{lo}, {hi}] is outside the "
                    f"{count} layers of {self.inputs[s.input]}")
            out.append((lo, hi))
        lengths = {hi - lo for lo, hi in out}
        if len(lengths) > 1:
            raise MergeInputError(f"slices[{i}]: every source must span the same number of layers, got "
                                  f"{[hi - lo for lo, hi in out]}")
        return out


def _layer_names(checkpoint) -> tuple[list[str], dict[int, list[str]]]:
    """(names outside the blocks, block index -> its names), in storage order."""
    outside: list[str] = []
    blocks: dict[int, list[str]] = {}
    for name in checkpoint.names:
        index = layer_index(name)
        if index is None:
            outside.append(name)
        else:
            blocks.setdefault(index, []).append(name)
    return outside, blocks


class _Resolver:
    """Turns one tensor's sources and settings into a TensorJob with checked values."""

    def __init__(self, method: MergeMethod, global_params: dict[str, Any]):
        self.method = method
        self.global_params = global_params
        self.per_expert = {h.name for h in method.hyperparameters if h.per_expert}
        self.ints = {h.name for h in method.hyperparameters if h.type == "int"}
        self._cache: dict[Any, ResolvedParams] = {}

    def job(self, sl: OutputSlice, srcs: list[tuple[Source, str]], out_name: str, t: float) -> TensorJob:
        base = [(s, n) for s, n in srcs if s.input == sl.base]
        others = [(s, n) for s, n in srcs if s.input != sl.base]
        ordered = base + others
        shared_keys = {k for scope in (sl.params, self.global_params) for k in scope} - self.per_expert
        shared = self._ints(resolve([sl.params, self.global_params], out_name, t, shared_keys))
        experts = [
            self._ints(resolve([s.params, sl.params, self.global_params], name, t,
                               self.per_expert | (set(s.params) - self.per_expert)))
            for s, name in others
        ]
        key = (repr(sorted(shared.items())), repr([sorted(e.items()) for e in experts]))
        resolved = self._cache.get(key)
        if resolved is None:
            try:
                resolved = validate_params(self.method, shared, experts, n_experts=len(experts))
            except MergeInputError as e:
                raise MergeInputError(f"tensor {out_name!r}: {e}") from None
            self._cache[key] = resolved
        return TensorJob(out_name, tuple((s.input, n) for s, n in ordered), bool(base),
                         resolved.params, resolved.expert_params)

    def _ints(self, values: dict[str, Any]) -> dict[str, Any]:
        # an integer hyperparameter read from a gradient takes the integer part (mergekit: int())
        return {k: (int(v) if k in self.ints and isinstance(v, float) else v) for k, v in values.items()}
