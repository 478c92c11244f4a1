"""Lazy, one-tensor-at-a-time access to the safetensors files of a checkpoint directory.

The `safetensors` package's numpy reader cannot return bfloat16, and its jax reader places every tensor on the
default device; checkpoints are bf16 and we want each tensor in host memory only until it is on its own
device(s). The format is small (an 8-byte little-endian header length, a JSON header of name -> dtype, shape,
byte range, then the data), so tensors are memory-mapped here and read with numpy + ml_dtypes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as the model it claims to hold."""


class TensorFiles:
    """The tensors of `directory`'s safetensors files by name: from `model.safetensors.index.json` when present
    (sharded checkpoints), otherwise from every `*.safetensors` file in the directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({error!r})") from None
            files = sorted({self.directory / name for name in weight_map.values()})
        else:
            weight_map = None
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{self.directory}: no *.safetensors files (expected model.safetensors, or shards listed in "
                    f"{INDEX_FILE})"
                )
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            data_start, header = _read_header(file)
            for name, entry in header.items():
                if name != "__metadata__" and (weight_map is None or weight_map.get(name) == file.name):
                    self._entries[name] = (file, data_start, entry)
        if weight_map is not None:
            absent = [name for name in weight_map if name not in self._entries]
            if absent:
                raise CheckpointError(
                    f"{index}: tensor '{absent[0]}' is listed in {weight_map[absent[0]]} but not stored there"
                )

    def names(self) -> set[str]:
        return set(self._entries)

    def file_of(self, name: str) -> Path:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map; slicing it reads only the bytes it needs."""
        if name not in self._entries:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        file, data_start, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise CheckpointError(f"{file}: tensor '{name}' holds {end - begin} bytes, expected {shape} {dtype}")
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _read_header(file: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict)."""
    try:
        with open(file, "rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as error:
        raise CheckpointError(f"{file}: not a safetensors file ({error!r})") from None
    data_bytes = file.stat().st_size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{file}: not a safetensors file (header entry {name!r}: {entry!r})")
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {entry['dtype']!r}")
        if entry["data_offsets"][1] > data_bytes:
            raise CheckpointError(
                f"{file}: tensor '{name}' ends at data byte {entry['data_offsets'][1]} but the file holds only "
                f"{max(data_bytes, 0)} (truncated?)"
            )
    return 8 + length, header
