"""Whole-model merges held in memory: read a checkpoint's tensors, write a merged state
as a checkpoint directory with the same contract as the streaming engine's output
(safetensors shards, copied config and tokenizer, merge_card.json + README.md).

Methods that are rules of their own (continual merging, Pareto fronts, LoRA-LEGO) build
many intermediate models; they keep one running state per tensor and use these helpers
to load their inputs and to write the final model. Merges computed on an HF model
(aTLAS, cross-seed merging) write its state_dict() through the same writer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mergescale.io_utils import atomic_directory
from mergescale.merge import card as card_module
from mergescale.merge.checkpoint import Checkpoint
from mergescale.merge.engine import DEFAULT_MAX_SHARD_BYTES, OUTPUT_DTYPES
from mergescale.merge.output import ShardedWriter, copy_model_files
from mergescale.merge.safetensors_io import PlannedTensor
from mergescale.merge.validation import check_configs, check_finite, check_tensors


def open_checkpoints(base: Path, experts: list[Path]) -> list[Checkpoint]:
    """Open base + experts and check they share config, tensor names and shapes
    (errors name the file and tensor). Returns [base, *experts]."""
    checkpoints = [Checkpoint(p) for p in [base, *experts]]
    check_configs(checkpoints)
    check_tensors(checkpoints)
    return checkpoints


def read_float(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One tensor in float32, refusing NaN/Inf with a message naming file and tensor."""
    t = checkpoint.read(name)
    check_finite(t, name, checkpoint)
    return t.float() if t.is_floating_point() else t


def load_state(path: Path | str | Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, as stored."""
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(Path(path))
    try:
        return {n: ckpt.read(n) for n in ckpt.names}
    finally:
        if not isinstance(path, Checkpoint):
            ckpt.close()


def average_states(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Entry-wise mean, in float32, of in-memory models with the same tensors and shapes
    (an error names the first model and tensor that differ)."""
    if not states:
        raise ValueError("averaging needs at least one model")
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        if s.keys() != first.keys():
            name = sorted(set(s) ^ set(first))[0]
            raise ValueError(f"model {i}: tensor {name!r} is not in every model")
        for n in first:
            if s[n].shape != first[n].shape:
                raise ValueError(f"model {i}: tensor {n!r} has shape {list(s[n].shape)}, "
                                 f"model 0 {list(first[n].shape)}")
    return {n: sum(s[n].to(torch.float32) for s in states) / len(states) for n in first}


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_merged_checkpoint(
    state: Mapping[str, torch.Tensor], reference: Path, out_dir: Path, card: dict[str, Any],
    dtype: str | None = "float32", started: float | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write ``state`` as a checkpoint like ``reference`` (config, tokenizer copied),
    atomically, with a merge card. ``card`` supplies method, description, paper, params,
    base, experts, seed; sizes, versions, wall time and peak RSS are filled in here.
    ``write_extra(tmp)`` may add files (e.g. an adapter) before the directory is renamed."""
    out_dtype = OUTPUT_DTYPES[dtype] if dtype else None
    ref = Checkpoint(reference)
    names = list(ref.names)
    ref.close()
    missing = sorted(set(names) - set(state))
    if missing:
        raise ValueError(f"merged state lacks tensor(s) of {reference}: {', '.join(missing[:5])}")

    def as_output(t: torch.Tensor) -> torch.Tensor:
        return t.to(out_dtype) if (out_dtype is not None and t.is_floating_point()) else t

    plan = [PlannedTensor(n, as_output(state[n]).dtype, tuple(state[n].shape)) for n in names]
    with atomic_directory(Path(out_dir)) as tmp:
        writer = ShardedWriter(tmp, plan, DEFAULT_MAX_SHARD_BYTES)
        try:
            for n in names:
                writer.write(n, as_output(state[n]).contiguous().cpu())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copied = copy_model_files(Path(reference), tmp, out_dtype)
        if write_extra is not None:
            write_extra(tmp)
        full = {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "dtype": dtype or "as input",
            **card,
            "n_tensors": len(names),
            "n_parameters": sum(state[n].numel() for n in names),
            "output_bytes": writer.total_bytes,
            "shards": writer.names,
            "copied_files": copied,
            **card_module.cost(time.perf_counter() if started is None else started),
        }
        card_module.write_card(tmp, full)
    return full
