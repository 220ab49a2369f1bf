"""Safetensors files at the byte level: validated headers, lazy reads, and a writer that streams one tensor at a time.

The conversions touch checkpoints of ~700 GB, so two properties matter more than convenience:

* Reading never trusts a file. Every header is parsed and checked against the file size *before* any work starts,
  so a truncated download or a corrupt shard is an error naming the file up front, not a crash an hour in.
* Writing never holds a whole shard in memory. ``safetensors.torch.save_file`` needs every tensor of a file at
  once; :func:`write_safetensors` instead writes the header from a plan (names, dtypes, shapes are known from the
  input headers) and then appends each tensor as it is produced, so peak memory is one tensor. The file is written
  under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = [
    "CheckpointError",
    "DTYPE_TO_STR",
    "STR_TO_DTYPE",
    "SafetensorsFile",
    "TensorPlan",
    "header_bytes",
    "read_header",
    "write_safetensors",
    "file_matches_plan",
]


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used; the message names the file and/or tensor."""


# The dtype spellings of the safetensors format.
STR_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):  # newer torch only; older ones simply cannot hold these
        STR_TO_DTYPE[_name] = getattr(torch, _attr)
DTYPE_TO_STR: dict[torch.dtype, str] = {v: k for k, v in STR_TO_DTYPE.items()}

# A header larger than this is not a real checkpoint header (the 671B index-sharded files have ~100 KB headers).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file, as its header says."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, TensorInfo], dict]:
    """Parse and validate a safetensors header.

    Returns ``(data_start, tensors in file order, metadata)``. Raises :class:`CheckpointError` naming the file when
    the file is too short, the header is not valid JSON, a dtype is unknown, offsets overlap or leave holes, or the
    data section is shorter than the header promises (a truncated download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, shorter than the 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length field says {header_len} bytes, "
                    f"file has {size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = STR_TO_DTYPE[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid header entry {entry!r}") from exc
        expected = math.prod(shape) * _itemsize(dtype)
        if end - start != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} {entry['dtype']} needs {expected} bytes but its offsets "
                f"span {end - start}"
            )
        tensors.append(TensorInfo(name, dtype, shape, start, end))
    tensors.sort(key=lambda t: (t.start, t.end))
    position = 0
    for info in tensors:
        if info.start != position:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor {info.name!r} starts at {info.start}, expected {position})")
        position = info.end
    data_start = 8 + header_len
    if size - data_start != position:
        state = "truncated" if size - data_start < position else "corrupt (trailing bytes)"
        raise CheckpointError(
            f"{path}: {state}: the header describes {position} bytes of tensor data but the file holds {size - data_start}"
        )
    return data_start, {t.name: t for t in tensors}, metadata


class SafetensorsFile:
    """One validated safetensors file; tensors are read lazily, whole or as a slice along one dim.

    Reads are plain ``readinto`` calls at the offsets of the validated header, not a memory map: the only memory a
    read takes is the tensor itself (a mapped 4 GB shard would otherwise count its touched pages as resident until it
    is unmapped), and a slice along dim 0 reads only its own rows.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data_start, self.tensors, self.metadata = read_header(self.path)
        self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def _read(self, name: str, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if self._handle is None:
            self._handle = open(self.path, "rb")
        buffer = bytearray(nbytes)
        self._handle.seek(self.data_start + offset)
        if self._handle.readinto(buffer) != nbytes:
            raise CheckpointError(f"{self.path}: ended while reading tensor {name!r} (was the file changed or truncated?)")
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or its ``[start:stop]`` slice along ``dim``."""
        info = self.info(name)
        if dim is None:
            return self._read(name, info.start, info.nbytes, info.dtype, info.shape)
        stop = info.shape[dim] if stop is None else stop
        if dim == 0 and info.shape:
            row = info.nbytes // max(1, info.shape[0])
            shape = (stop - start,) + info.shape[1:]
            return self._read(name, info.start + start * row, (stop - start) * row, info.dtype, shape)
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._read(name, info.start, info.nbytes, info.dtype, info.shape)[index].contiguous()


@dataclass
class TensorPlan:
    """One tensor an output file will hold; ``produce`` computes it when the file is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def header_bytes(plans: Iterable[TensorPlan], metadata: dict[str, str] | None = None) -> bytes:
    """The exact header (length prefix included) a file with these tensors, in this order, gets."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for plan in plans:
        if plan.name in header:
            raise CheckpointError(f"tensor {plan.name!r} is planned twice in one file")
        header[plan.name] = {"dtype": DTYPE_TO_STR[plan.dtype], "shape": list(plan.shape), "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The format pads the header with spaces so tensor data starts 8-byte aligned.
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_matches_plan(path: Path, plans: list[TensorPlan]) -> bool:
    """Whether ``path`` is a finished file of exactly this plan: same header bytes and full data length.

    Files only ever reach their final name through an atomic rename after an fsync, so a file there with the planned
    header and size is complete; this check guards against leftovers of a different run.
    """
    try:
        expected = header_bytes(plans)
        if path.stat().st_size != len(expected) + sum(p.nbytes for p in plans):
            return False
        with open(path, "rb") as f:
            return f.read(len(expected)) == expected
    except OSError:
        return False


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: Path, plans: list[TensorPlan], progress=None) -> None:
    """Write ``plans`` to ``path`` one tensor at a time, via ``path.tmp`` and an atomic rename.

    Each produced tensor must have its planned dtype and shape; a mismatch is an error naming the tensor (and the
    temporary file is removed, so nothing half-written stays behind).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header_bytes(plans))
            for plan in plans:
                tensor = plan.produce()
                if tensor.dtype != plan.dtype or tuple(tensor.shape) != tuple(plan.shape):
                    raise CheckpointError(
                        f"tensor {plan.name!r}: produced {tensor.dtype} {list(tensor.shape)}, planned {plan.dtype} "
                        f"{list(plan.shape)}"
                    )
                f.write(_tensor_bytes(tensor))
                del tensor
                if progress is not None:
                    progress.update(plan.nbytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # KeyboardInterrupt included: an interrupted file must never look finished.
        tmp.unlink(missing_ok=True)
        raise
