"""A checkpoint directory as one lazily read tensor store: its shards, its index and its config.

Opening a :class:`Checkpoint` reads and validates every shard header (cheap: a few hundred KB for the 671B release)
and cross-checks the index, so every later read can assume consistent files. Conversions open with
``strict=True`` and stop at the first problem; ``verify`` opens with ``strict=False`` and reports all of them.
Nothing here ever writes to the directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .shards import CheckpointError, SafetensorsFile, TensorInfo

__all__ = ["Checkpoint", "INDEX_NAME", "SINGLE_NAME", "load_config_dict"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def load_config_dict(path: str | os.PathLike) -> dict:
    """The raw ``config.json`` (a directory or the file itself), with an error naming the file when unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a DeepSeek-V3.2 checkpoint needs its config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


class Checkpoint:
    """The tensors of a checkpoint directory.

    Args:
        directory: the checkpoint directory.
        files: explicit shard file names (relative to ``directory``) to read instead of discovering them from the
            index; used for the demo format's ``model{rank}-mp{N}.safetensors`` files, which have no index.
        strict: raise :class:`CheckpointError` on the first problem (default); otherwise collect problems in
            ``self.problems`` and keep whatever is readable.
    """

    def __init__(self, directory: str | os.PathLike, files: list[str] | None = None, strict: bool = True):
        self.directory = Path(directory)
        self.strict = strict
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.index: dict | None = None
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        listed = self._discover() if files is None else list(files)
        self.files: dict[str, SafetensorsFile] = {}
        for name in listed:
            path = self.directory / name
            if not path.is_file():
                self._problem(f"{path}: missing shard file")
                continue
            try:
                self.files[name] = SafetensorsFile(path)
            except CheckpointError as exc:
                self._problem(str(exc))
        self.locations: dict[str, str] = {}
        self.duplicates: dict[str, list[str]] = {}
        for file_name, shard in self.files.items():
            for tensor in shard.tensors:
                if tensor in self.locations:
                    self.duplicates.setdefault(tensor, [self.locations[tensor]]).append(file_name)
                else:
                    self.locations[tensor] = file_name
        for tensor, where in self.duplicates.items():
            self._problem(f"tensor {tensor!r} is stored more than once: in {', '.join(where)}")
        if self.index is not None:
            self._check_index()

    # -- discovery -----------------------------------------------------------------------------------------------
    def _problem(self, message: str) -> None:
        if self.strict:
            raise CheckpointError(message)
        self.problems.append(message)

    def _discover(self) -> list[str]:
        index_path = self.directory / INDEX_NAME
        present = sorted(p.name for p in self.directory.glob("*.safetensors") if p.is_file())
        if index_path.exists():
            try:
                self.index = json.loads(index_path.read_text(encoding="utf-8"))
                weight_map = self.index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from exc
            listed = sorted(set(weight_map.values()))
            for stray in sorted(set(present) - set(listed)):
                message = f"{self.directory / stray}: safetensors file not listed in {INDEX_NAME}"
                # A stray file cannot confuse a conversion (only indexed files are read), but verify flags it.
                if self.strict:
                    self.warnings.append(message)
                else:
                    self.problems.append(message)
            return listed
        if SINGLE_NAME in present:
            others = [p for p in present if p != SINGLE_NAME]
            if others:
                self._problem(f"{self.directory}: has {SINGLE_NAME} and other safetensors files ({', '.join(others)}) but no {INDEX_NAME}")
            return [SINGLE_NAME]
        if len(present) == 1:
            return present
        if not present:
            raise CheckpointError(f"{self.directory}: no safetensors files")
        self._problem(f"{self.directory}: {len(present)} safetensors files but no {INDEX_NAME} to say which to load")
        return present

    def _check_index(self) -> None:
        weight_map: dict[str, str] = self.index["weight_map"]
        for tensor, file_name in weight_map.items():
            shard = self.files.get(file_name)
            if shard is not None and tensor not in shard.tensors:
                actual = self.locations.get(tensor)
                where = f"; it is in {actual}" if actual else ""
                self._problem(f"{INDEX_NAME}: maps {tensor!r} to {file_name}, which does not hold it{where}")
        for file_name, shard in self.files.items():
            for tensor in shard.tensors:
                if weight_map.get(tensor) is None:
                    self._problem(f"{INDEX_NAME}: does not list tensor {tensor!r} stored in {file_name}")
        total = (self.index.get("metadata") or {}).get("total_size")
        actual = sum(info.nbytes for shard in self.files.values() for info in shard.tensors.values())
        if total is not None and total != actual:
            self.warnings.append(f"{INDEX_NAME}: metadata.total_size is {total} but the shards hold {actual} bytes of tensors")

    # -- access --------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (file order, then offset), each once."""
        return list(self.locations)

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def info(self, name: str) -> TensorInfo:
        try:
            return self.files[self.locations[name]].tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: checkpoint has no tensor {name!r}") from None

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        self.info(name)
        return self.files[self.locations[name]].get(name, dim, start, stop)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for shard in self.files.values() for info in shard.tensors.values())

    def source_signature(self) -> list:
        """Names, sizes and modification times of the shards: a resumed job must read the same inputs."""
        rows = []
        for name, shard in self.files.items():
            stat = shard.path.stat()
            rows.append([str(shard.path.resolve()), stat.st_size, stat.st_mtime_ns])
        return rows
