"""Checks that a set of checkpoints can be merged, before anything is written."""

from __future__ import annotations

import torch

from mergescale.merge.checkpoint import Checkpoint
from mergescale.merge.errors import MergeInputError

# config.json keys that must agree for tensors with equal names to mean the same thing.
_ARCHITECTURE_KEYS = ("model_type", "architectures")


def check_configs(checkpoints: list[Checkpoint]) -> None:
    """Every config.json present agrees on model_type and architectures."""
    with_config = [c for c in checkpoints if c.config is not None]
    if not with_config:
        return
    ref = with_config[0]
    for other in with_config[1:]:
        for key in _ARCHITECTURE_KEYS:
            a, b = ref.config.get(key), other.config.get(key)
            if a != b:
                raise MergeInputError(
                    f"config.json {key} differs: {a!r} in {ref.path / 'config.json'} vs "
                    f"{b!r} in {other.path / 'config.json'}"
                )


def check_tensors(checkpoints: list[Checkpoint]) -> list[str]:
    """Every checkpoint holds the same tensor names with the same shapes and dtypes.

    Returns the tensor names in the first checkpoint's storage order.
    """
    ref = checkpoints[0]
    ref_names = set(ref.names)
    for other in checkpoints[1:]:
        names = set(other.names)
        missing = sorted(ref_names - names)
        if missing:
            raise MergeInputError(
                f"tensor {missing[0]!r} is missing from {other.path} "
                f"(present in {ref.file_of(missing[0])}; {len(missing)} missing in all)"
            )
        extra = sorted(names - ref_names)
        if extra:
            raise MergeInputError(
                f"tensor {extra[0]!r} is missing from {ref.path} "
                f"(present in {other.file_of(extra[0])}; {len(extra)} missing in all)"
            )
        for name in ref.names:
            if other.shape(name) != ref.shape(name):
                raise MergeInputError(
                    f"tensor {name!r}: shape {list(ref.shape(name))} in {ref.file_of(name)} "
                    f"vs {list(other.shape(name))} in {other.file_of(name)}"
                )
            if other.dtype(name) != ref.dtype(name):
                raise MergeInputError(
                    f"tensor {name!r}: dtype {ref.dtype(name)} in {ref.file_of(name)} "
                    f"vs {other.dtype(name)} in {other.file_of(name)}"
                )
    return list(ref.names)


def check_finite(tensor: torch.Tensor, name: str, checkpoint: Checkpoint) -> None:
    """Raise naming the tensor and file if a float tensor holds NaN or Inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # min and max propagate NaN and show +-Inf: one cheap reduction instead of an
    # elementwise isfinite mask over every input tensor
    low, high = torch.aminmax(tensor)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeInputError(
            f"tensor {name!r} in {checkpoint.file_of(name)} contains {bad} NaN/Inf values"
        )
