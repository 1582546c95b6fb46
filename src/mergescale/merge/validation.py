"""Checks that a set of checkpoints can be merged, before anything is written."""

from __future__ import annotations

import re

import torch

from mergescale.merge import compiled
from mergescale.merge.checkpoint import Checkpoint
from mergescale.merge.errors import MergeInputError

# config.json keys that must agree for tensors with equal names to mean the same thing.
_ARCHITECTURE_KEYS = ("model_type", "architectures")
# Tensors with one row per vocabulary entry (input embeddings, output heads) across
# common architectures; a row count equal to config.json's vocab_size also counts.
_VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|shared)\.weight$"
)


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
        _check_shapes(ref, other)
        for name in ref.names:
            check_castable(name, (ref, name), (other, name))
    return list(ref.names)


def check_castable(name: str, a: tuple[Checkpoint, str], b: tuple[Checkpoint, str]) -> None:
    """Float inputs of any float dtype merge (cast to float32); an integer tensor merges
    only with the same integer dtype, since it is copied, not computed."""
    (ca, na), (cb, nb) = a, b
    da, db = ca.dtype(na), cb.dtype(nb)
    if da == db or (da.is_floating_point and db.is_floating_point):
        return
    raise MergeInputError(
        f"tensor {name!r}: dtype {da} in {ca.file_of(na)} cannot be merged with {db} in "
        f"{cb.file_of(nb)} (only floating-point dtypes are cast to the computation dtype)"
    )


def check_jobs(checkpoints: list[Checkpoint], jobs) -> None:
    """Every input tensor of every job (mergescale.merge.layout.TensorJob) exists, and the
    inputs of one job agree in shape and have castable dtypes."""
    for job in jobs:
        for c, name in job.sources:
            if name not in checkpoints[c].names_set:
                raise MergeInputError(f"tensor {name!r} (for output tensor {job.name!r}) is missing from "
                                      f"{checkpoints[c].path}")
    # A different architecture is reported before a vocabulary mismatch (as _check_shapes).
    vocabulary = None
    for job in jobs:
        (c0, n0), rest = job.sources[0], job.sources[1:]
        ref = checkpoints[c0]
        for c, name in rest:
            other = checkpoints[c]
            if other.shape(name) == ref.shape(n0):
                continue
            if name == n0 and _is_vocab_rows(name, ref, other):
                vocabulary = vocabulary or (name, ref, other)
                continue
            raise MergeInputError(
                f"tensor {name!r}: shape {list(ref.shape(n0))} in {ref.file_of(n0)} "
                f"vs {list(other.shape(name))} in {other.file_of(name)}")
    if vocabulary:
        raise _vocabulary_error(*vocabulary)
    for job in jobs:
        (c0, n0), rest = job.sources[0], job.sources[1:]
        for c, name in rest:
            check_castable(name, (checkpoints[c0], n0), (checkpoints[c], name))


def _vocab_size(checkpoint: Checkpoint) -> int | None:
    config = checkpoint.config or {}
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def _is_vocab_rows(name: str, a: Checkpoint, b: Checkpoint) -> bool:
    """Shapes of `name` differ only in the row count, and the rows are vocabulary entries."""
    sa, sb = a.shape(name), b.shape(name)
    if len(sa) != len(sb) or not sa or sa[0] == sb[0] or sa[1:] != sb[1:]:
        return False
    return bool(_VOCAB_TENSOR.search(name)) or (_vocab_size(a), _vocab_size(b)) == (sa[0], sb[0])


def _check_shapes(ref: Checkpoint, other: Checkpoint) -> None:
    """Shapes agree. A different architecture is reported before a vocabulary mismatch,
    since resizing embeddings would not fix it."""
    differing = [n for n in ref.names if other.shape(n) != ref.shape(n)]
    if not differing:
        return
    structural = [n for n in differing if not _is_vocab_rows(n, ref, other)]
    if structural:
        name = structural[0]
        raise MergeInputError(
            f"tensor {name!r}: shape {list(ref.shape(name))} in {ref.file_of(name)} "
            f"vs {list(other.shape(name))} in {other.file_of(name)}"
        )
    raise _vocabulary_error(differing[0], ref, other)


def _vocabulary_error(name: str, ref: Checkpoint, other: Checkpoint) -> MergeInputError:
    rows, other_rows = ref.shape(name)[0], other.shape(name)[0]
    return MergeInputError(
        f"vocabulary size mismatch in tensor {name!r}: {rows} rows in {ref.file_of(name)} vs "
        f"{other_rows} rows in {other.file_of(name)}. Every model must use the tokenizer of "
        f"{ref.path}: resize the embeddings of {other.path} to its {rows}-token vocabulary "
        "before merging (if the tokenizers agree on the shared tokens), or pick experts "
        "fine-tuned from the same base"
    )


def check_finite(tensor: torch.Tensor, name: str, checkpoint: Checkpoint) -> None:
    """Raise naming the tensor and file if a float tensor holds NaN or Inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    bad = compiled.count_non_finite(tensor)
    if bad:
        raise MergeInputError(
            f"tensor {name!r} in {checkpoint.file_of(name)} contains {bad} NaN/Inf values"
        )
