"""Reading records: every row of a JSONL file, of a directory of JSONL / JSON / Parquet / CSV files (an HF dataset
repo as downloaded), or of an HF dataset id (through the hub cache; `HF_HUB_OFFLINE` honoured), with where it came
from (`file:line`). Training data and the eval harness's tasks both read through here. Parquet needs `pyarrow`
(the `data` extra). Columns other than the record's are left to the caller.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptoss_jax import hub

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message starts with `file:line:`."""


def read_records(source: str | os.PathLike, *, split: str = "train", revision: str | None = None
                 ) -> Iterator[tuple[str, Any]]:
    """(where, record) for every row of a JSONL file, a dataset directory or an HF dataset id. A row that is not
    JSON is yielded as a `DataError` for the caller to raise or skip; a file that is not UTF-8 text, or a .json
    file that is not JSON, raises one."""
    for file in _data_files(source, split, revision):
        try:
            yield from _file_rows(file)
        except UnicodeDecodeError as error:
            raise DataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _file_rows(file: Path) -> Iterator[tuple[str, Any]]:
    if file.suffix == ".parquet":
        yield from _parquet_rows(file)
    elif file.suffix == ".csv":  # a header line, then one row per record (GPQA is published this way)
        with open(file, encoding="utf-8", newline="") as lines:
            for number, row in enumerate(csv.DictReader(lines), start=1):
                yield f"{file}:row {number}", row
    elif file.suffix == ".json" and not _is_json_lines(file):
        try:
            rows = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{error.lineno}: not JSON ({error.msg})") from None
        for number, row in enumerate(rows if isinstance(rows, list) else [rows], start=1):
            yield f"{file}:{number}", row
    else:
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        yield f"{file}:{number}", json.loads(line)
                    except json.JSONDecodeError as error:
                        yield f"{file}:{number}", DataError(f"{file}:{number}: not JSON ({error.msg})")


def _data_files(source: str | os.PathLike, split: str, revision: str | None) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        if not hub.is_repo_id(str(source)):
            raise DataError(f"{source}: no such file or directory, nor an HF dataset id like 'owner/name'")
        try:
            path = hub.snapshot(str(source), repo_type="dataset", revision=revision,
                                allow_patterns=[f"*{suffix}" for suffix in _DATA_SUFFIXES])
        except OSError as error:
            raise DataError(str(error)) from None
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in _DATA_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    in_split = [p for p in files if split in p.relative_to(path).as_posix()]
    if not (in_split or files):
        raise DataError(f"{path}: no {', '.join(_DATA_SUFFIXES)} files")
    return in_split or files


def _is_json_lines(file: Path) -> bool:
    with open(file, encoding="utf-8") as stream:
        return stream.read(1).lstrip() != "["


def _parquet_rows(file: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading Parquet needs pyarrow (pip install 'gptoss-jax[data]')") from None
    number = 0
    for batch in pq.ParquetFile(file).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield f"{file}:row {number}", row
