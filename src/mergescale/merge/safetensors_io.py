"""Read and write the safetensors format one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
then the raw little-endian tensor bytes; offsets are relative to the byte after the
header. https://github.com/huggingface/safetensors#format

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a merge
touches then counts towards the process's resident set until the handle closes, so the
RSS of a streaming merge grows to the size of all inputs. Reading each tensor with
`os.preadv` into a fresh buffer keeps resident memory at the tensors in flight, and
parsing the header ourselves lets a truncated or corrupt file fail with its name before
any output is written. The writer plans every offset up front (shapes are known after
validation), writes the header first and then appends tensors as they are merged, so a
shard of any size is written with one tensor in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from mergescale.io_utils import reporting_write_errors
from mergescale.merge.errors import MergeInputError
from mergescale.merge.compiled import count_non_finite

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# A header larger than this is not a real checkpoint (the reference library uses 100 MB).
_MAX_HEADER_BYTES = 100_000_000
_ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of a safetensors file.

    Returns ({tensor name: TensorInfo}, metadata). Raises MergeInputError naming the
    file when the header is corrupt or the file is shorter than the header declares.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MergeInputError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise MergeInputError(
                    f"{path}: corrupt or truncated safetensors file "
                    f"(header declares {header_len} bytes, file has {size})"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise MergeInputError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeInputError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise MergeInputError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise MergeInputError(f"{path}: corrupt header entry for tensor {name!r}") from e
        if dtype_name not in DTYPES:
            raise MergeInputError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        info = TensorInfo(DTYPES[dtype_name], shape, data_start + begin, end - begin)
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        if begin < 0 or end < begin or info.nbytes != info.numel * itemsize:
            raise MergeInputError(
                f"{path}: corrupt header entry for tensor {name!r} "
                f"(offsets {begin}..{end} do not hold {dtype_name}{list(shape)})"
            )
        if end > data_size:
            raise MergeInputError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                f"{data_start + end}, file has {size})"
            )
        tensors[name] = info
    return tensors, metadata


def read_tensor(fd: int, info: TensorInfo, path: Path) -> torch.Tensor:
    """Read one tensor with positional reads (thread-safe, no shared file offset)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < info.nbytes:
        # preadv may return short counts (e.g. above 2 GiB per call on Linux).
        n = os.preadv(fd, [view[done:]], info.begin + done)
        if n <= 0:
            raise MergeInputError(f"{path}: unexpected end of file while reading tensor data")
        done += n
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return buf.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


class StreamingSafetensorsWriter:
    """Write one safetensors file whose tensors arrive one by one, in planned order."""

    def __init__(self, path: Path, plan: Iterable[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._plan = list(plan)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in self._plan:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        self.total_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % _ALIGN)  # pad so tensor data starts 8-byte aligned
        with reporting_write_errors(self.path):
            self._file = open(self.path, "wb")
            self._file.write(struct.pack("<Q", len(raw)))
            self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._plan[self._next]
        if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(
                f"{self.path}: expected {expected.name} {expected.dtype}{list(expected.shape)}, "
                f"got {name} {tensor.dtype}{list(tensor.shape)}"
            )
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            # a full disk raises here (buffered writes retry short writes until an error)
            with reporting_write_errors(self.path):
                self._file.write(memoryview(data.numpy()))
        self._next += 1

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Write tensor `name` from its flat pieces, in order (a tensor too big to hold)."""
        expected = self._plan[self._next]
        numel = 1
        for d in expected.shape:
            numel *= d
        done = 0
        for piece in pieces:
            if name != expected.name or piece.dtype != expected.dtype or done + piece.numel() > numel:
                raise RuntimeError(f"{self.path}: expected {expected.name} {expected.dtype}{list(expected.shape)}, "
                                   f"got a piece of {name} {piece.dtype} past element {done}")
            data = piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            with reporting_write_errors(self.path):
                self._file.write(memoryview(data.numpy()))
            done += piece.numel()
        if done != numel:
            raise RuntimeError(f"{self.path}: {name}: {done} of {numel} elements written")
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        missing = len(self._plan) - self._next
        with reporting_write_errors(self.path):  # flushes the last buffered bytes
            self._file.close()
        if missing:
            raise RuntimeError(f"{self.path}: closed with {missing} tensors not written")

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:  # the flush failed too (disk still full): the file is discarded anyway
            pass


class FileSource:
    """One tensor of a safetensors file, read by flat element ranges: a merge of a
    tensor too big to hold reads it block by block (the interface of
    mergescale.merge.ops.TensorSource). Each range read is checked to be finite."""

    in_memory = False

    def __init__(self, fd: int, info: TensorInfo, path: Path, name: str):
        self.fd, self.info, self.path, self.name = fd, info, Path(path), name
        self.shape, self.dtype, self.numel = info.shape, info.dtype, info.numel
        self._itemsize = torch.empty((), dtype=info.dtype).element_size()

    def read(self, start: int, end: int) -> torch.Tensor:
        part = TensorInfo(self.dtype, (end - start,), self.info.begin + start * self._itemsize,
                          (end - start) * self._itemsize)
        t = read_tensor(self.fd, part, self.path)
        if t.is_floating_point() and t.numel():
            bad = count_non_finite(t)
            if bad:
                raise MergeInputError(f"tensor {self.name!r} in {self.path} contains {bad} NaN/Inf values "
                                      f"(among elements {start}..{end})")
        return t
