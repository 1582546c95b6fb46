"""The output checkpoint: shard layout, streaming shard writes, copied model files."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import torch

from mergescale.io_utils import reporting_write_errors
from mergescale.merge.safetensors_io import PlannedTensor, StreamingSafetensorsWriter

# Files copied verbatim from the reference input (base, or first expert without base).
MODEL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template*",
    "preprocessor_config.json",
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy consecutive shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """Hugging Face's names: model.safetensors, or model-0000i-of-0000n.safetensors."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class ShardedWriter:
    """Writes tensors, in plan order, into the planned shards; one open file at a time."""

    def __init__(self, out_dir: Path, tensors: list[PlannedTensor], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self._shard = -1
        self._left = 0
        self._writer: StreamingSafetensorsWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._open_next().write(name, tensor)
        self._left -= 1

    def write_pieces(self, name: str, pieces) -> None:
        """Write tensor `name` from its flat pieces in order (see StreamingSafetensorsWriter)."""
        self._open_next().write_pieces(name, pieces)
        self._left -= 1

    def _open_next(self) -> StreamingSafetensorsWriter:
        if self._left == 0:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._left = len(self.shards[self._shard])
            self._writer = StreamingSafetensorsWriter(
                self.out_dir / self.names[self._shard], self.shards[self._shard]
            )
        assert self._writer is not None
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if len(self.shards) > 1:
            weight_map = {t.name: fname for shard, fname in zip(self.shards, self.names) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            path = self.out_dir / "model.safetensors.index.json"
            with reporting_write_errors(path), open(path, "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard)


def copy_model_files(src: Path, dst: Path, out_dtype: torch.dtype | None, n_layers: int | None = None) -> list[str]:
    """Copy config, generation config and tokenizer files; record the output dtype in
    config.json, and the layer count when slices changed it."""
    copied = []
    config_path = src / "config.json"
    if config_path.is_file():
        with open(config_path) as f:
            config = json.load(f)
        if out_dtype is not None:
            # transformers 5 writes "dtype", older versions "torch_dtype"
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
            for key in keys:
                config[key] = DTYPE_NAMES[out_dtype]
        if n_layers is not None and config.get("num_hidden_layers", n_layers) != n_layers:
            config["num_hidden_layers"] = n_layers
        with reporting_write_errors(dst / "config.json"), open(dst / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        copied.append("config.json")
    for entry in sorted(src.iterdir()):
        if entry.is_file() and any(fnmatch.fnmatch(entry.name, pat) for pat in MODEL_FILES):
            with reporting_write_errors(dst / entry.name):
                shutil.copy2(entry, dst / entry.name)
            copied.append(entry.name)
    return copied
