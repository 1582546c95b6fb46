"""A model directory seen as a lazy map from tensor name to tensor.

Opening a checkpoint reads only headers (and config.json); tensors are read one at a
time on demand. Sharded checkpoints (`model.safetensors.index.json`) and single files
are both accepted. Pickle checkpoints (`pytorch_model.bin`) are refused unless the
caller allows them, and even then are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mergescale.merge.errors import MergeInputError
from mergescale.merge.safetensors_io import FileSource, TensorInfo, read_header, read_tensor

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MergeInputError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise MergeInputError(f"{path}: expected a JSON object")
    return data


def _contents(path: Path, shown: int = 5) -> str:
    """'the directory is empty', or its first few entries, for messages about what is missing."""
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return "the directory is empty"
    more = f", ... ({len(entries)} entries)" if len(entries) > shown else ""
    return "it holds only " + ", ".join(entries[:shown]) + more


class Checkpoint:
    """Tensors of one model directory, read lazily.

    `names` lists tensor names in storage order (file, then offset) so a full pass reads
    each file front to back.
    """

    def __init__(self, path: Path | str, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is a file" if self.path.exists() else "does not exist"
            raise MergeInputError(f"{self.path}: not a directory ({what}; expected a model checkpoint)")
        config_path = self.path / "config.json"
        self.config: dict | None = _load_json(config_path) if config_path.is_file() else None
        self._fds: dict[Path, int] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._files: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}

        files = self._safetensors_files()
        if files is not None:
            for file in files:
                infos, _ = read_header(file)
                for name, info in infos.items():
                    if name in self._infos:
                        raise MergeInputError(
                            f"{self.path}: tensor {name!r} stored twice ({self._files[name].name}, {file.name})"
                        )
                    self._infos[name] = info
                    self._files[name] = file
            self.names = sorted(self._infos, key=lambda n: (str(self._files[n]), self._infos[n].begin))
        else:
            self._load_pickle(allow_pickle)
            assert self._pickled is not None
            self.names = list(self._pickled)

    # -- discovery -------------------------------------------------------------------
    def _safetensors_files(self) -> list[Path] | None:
        index_path = self.path / SAFETENSORS_INDEX
        if index_path.is_file():
            index = _load_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MergeInputError(f"{index_path}: no 'weight_map' in the index")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.path / name).is_file():
                    raise MergeInputError(f"{index_path}: shard {name} listed in the index is missing")
            return [self.path / name for name in files]
        if (self.path / SAFETENSORS_SINGLE).is_file():
            return [self.path / SAFETENSORS_SINGLE]
        others = sorted(p for p in self.path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
        if others:
            return others
        if (self.path / "adapter_model.safetensors").is_file():
            raise MergeInputError(
                f"{self.path}: holds only a PEFT adapter (adapter_model.safetensors); "
                "merge the adapter into its base model before model merging"
            )
        return None

    def _load_pickle(self, allow_pickle: bool) -> None:
        present = [n for n in PICKLE_NAMES if (self.path / n).is_file()]
        if not present:
            raise MergeInputError(
                f"{self.path}: no model weights (*.safetensors or pytorch_model.bin) found; "
                f"{_contents(self.path)}"
            )
        if not allow_pickle:
            raise MergeInputError(
                f"{self.path / present[0]}: pickle checkpoints are refused (they can run code "
                "when loaded); convert to safetensors or pass allow_pickle=True"
            )
        if (self.path / PICKLE_NAMES[1]).is_file():
            weight_map = _load_json(self.path / PICKLE_NAMES[1]).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = [PICKLE_NAMES[0]]
        state: dict[str, torch.Tensor] = {}
        for name in files:
            file = self.path / name
            try:
                # weights_only refuses arbitrary objects; mmap avoids reading it all twice.
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises several types for bad pickles
                raise MergeInputError(f"{file}: cannot load pickle checkpoint ({e})") from e
            if not isinstance(part, dict):
                raise MergeInputError(f"{file}: expected a state dict, got {type(part).__name__}")
            for key, value in part.items():
                if not isinstance(value, torch.Tensor):
                    raise MergeInputError(f"{file}: entry {key!r} is not a tensor")
                state[key] = value
                self._files[key] = file
        self._pickled = state

    # -- access ----------------------------------------------------------------------
    @property
    def names_set(self) -> set[str]:
        if getattr(self, "_names_set", None) is None:
            self._names_set = set(self.names)
        return self._names_set

    def file_of(self, name: str) -> Path:
        return self._files[name]

    def dtype(self, name: str) -> torch.dtype:
        if self._pickled is not None:
            return self._pickled[name].dtype
        return self._infos[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return self._infos[name].shape

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as a fresh CPU tensor the caller owns."""
        if self._pickled is not None:
            return self._pickled[name].clone()
        file = self._files[name]
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return read_tensor(fd, self._infos[name], file)

    def source(self, name: str):
        """The tensor `name` as a FileSource read by flat ranges (safetensors only)."""
        file = self._files[name]
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return FileSource(fd, self._infos[name], file, name)

    @property
    def is_safetensors(self) -> bool:
        return self._pickled is None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
