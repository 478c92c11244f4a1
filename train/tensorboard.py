"""TensorBoard scalars without TensorFlow: `events.out.tfevents.*` files written directly.

An event file is a TFRecord stream (length, masked CRC-32C of the length, the bytes, masked CRC-32C of the
bytes) of `Event` protocol buffers: wall_time (1, double), step (2, int64), file_version (3, string) and
summary (5) holding values of tag (1, string) and simple_value (2, float).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
    event = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step)
    if file_version:
        event += _field(3, file_version.encode())
    if summary:
        event += _field(5, summary)
    return event


class SummaryWriter:
    """Appends scalar summaries to one event file in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._write(_event(0, file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(
            _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", float(value)))
            for tag, value in values.items()
        )
        self._write(_event(step, summary=summary))

    def _write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(length + struct.pack("<I", _masked_crc32c(length)) + record
                         + struct.pack("<I", _masked_crc32c(record)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
