"""Training data: conversation records -> harmony tokens + loss masks -> fixed-length packed rows.

Records come through `gptoss_jax.records` (JSONL files, dataset directories, HF dataset ids), or from memory (a
list of records, a `datasets.Dataset`). Columns other than the record's are ignored, so HF datasets with extra
columns (e.g. HuggingFaceH4/Multilingual-Thinking) load as they are. A record has one of the forms TRL's
SFTTrainer takes (`as_conversation`): conversational `{"messages": [...]}`, prompt-completion `{"prompt": ...,
"completion": ...}`, or language modeling `{"text": ...}`.

A row packs several examples back to back: `inputs` predict `targets` (the next token), `weights` mark the
targets that count in the loss, `segment_ids` number the examples in the row (0 = padding) so attention stays
inside each example, and `positions` restart at 0 for each example.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.records import DataError, read_records

log = logging.getLogger(__name__)

OVERLONG = ("truncate", "drop")
SHUFFLE = ("examples", "rows", "none")


@dataclasses.dataclass
class DataStats:
    records: int = 0  # rows read
    invalid: int = 0  # rows skipped as invalid (skip_invalid=True)
    truncated: int = 0  # examples longer than a row, cut to fit
    dropped: int = 0  # examples longer than a row, left out (overlong="drop", or nothing trainable left)
    examples: int = 0  # examples packed
    rows: int = 0  # rows this host got
    rows_left_over: int = 0  # rows left out so every host gets the same number
    tokens: int = 0  # non-padding tokens in this host's rows

    def report(self) -> str:
        return (f"{self.records} records ({self.invalid} invalid, skipped), {self.examples} examples packed into "
                f"{self.rows} rows; {self.truncated} truncated, {self.dropped} dropped as too long; "
                f"{self.rows_left_over} rows left over to balance hosts")


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]: tokens the loss trains
    where: str  # file:line of its record


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Arrays [rows, seq_len]."""

    inputs: np.ndarray  # int32
    targets: np.ndarray  # int32
    weights: np.ndarray  # float32, 1 where the target is trained
    segment_ids: np.ndarray  # int32, 1.. per example, 0 for padding
    positions: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.inputs)


# ---- rendering and packing -------------------------------------------------------------------------------------


def encode_examples(rows, *, train_on: str = "assistant", skip_invalid: bool = False,
                    stats: DataStats | None = None) -> list[Example]:
    """Renders each (where, record) with its loss mask. A bad row raises `DataError("file:line: reason")`, or
    with `skip_invalid` is counted in `stats.invalid` and left out."""
    stats = stats if stats is not None else DataStats()
    examples = []
    for where, record in rows:
        stats.records += 1
        try:
            if isinstance(record, DataError):
                raise record
            record = as_conversation(record)
            if isinstance(record, str):  # raw text: every token trained
                tokens = tok.get_encoding().encode(record, allowed_special="all")
                tokens += [] if tokens[-1:] == [tok.RETURN] else [tok.RETURN]
                mask = [True] * len(tokens)
            else:
                tokens, mask = harmony.encode_for_training(_plain(record), train_on=train_on)
        except (harmony.RecordError, DataError) as error:
            if not skip_invalid:
                message = str(error) if str(error).startswith(where) else f"{where}: {error}"
                raise DataError(message) from None
            stats.invalid += 1
            continue
        examples.append(Example(np.asarray(tokens, np.int32), np.asarray(mask, bool), where))
    if stats.invalid:
        log.warning("skipped %d invalid records of %d", stats.invalid, stats.records)
    return examples


def as_conversation(record: Any) -> Any:
    """A record in any of the forms TRL's SFTTrainer takes, as a harmony record (or, for raw text, the text):
      - `{"messages": [...]}`: as it is;
      - `{"prompt": ..., "completion": ...}`, each a text or a list of messages: a text prompt is the user's
        message, a text completion the assistant's final answer; the completion is the last turn, the one trained
        (TRL's completion-only loss); other fields (reasoning_effort, tools, ...) stay;
      - `{"text": "..."}`: raw text, tokenized as it is (special tokens written in it are those tokens), every
        token trained, `<|return|>` appended unless it ends with it (TRL appends the EOS token).
    Anything else is a RecordError naming the forms."""
    if not isinstance(record, Mapping):
        raise harmony.RecordError(f"expected a record object, got {type(record).__name__}")
    if "messages" in record:
        return record
    if "prompt" in record or "completion" in record:
        prompt = _messages(record.get("prompt"), "prompt", "user")
        completion = _messages(record.get("completion"), "completion", "assistant")
        rest = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
        return {**rest, "messages": prompt + completion}
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise harmony.RecordError(f"text: expected a non-empty string, got {record['text']!r:.60}")
        return record["text"]
    raise harmony.RecordError(f"a record has 'messages' (a conversation), 'prompt' and 'completion', or 'text'; "
                              f"this one has {sorted(record)}")


def _messages(value: Any, field: str, role: str) -> list:
    """A prompt's or completion's messages: a text is one message of `role` (the assistant's as its final answer)."""
    if isinstance(value, str) and value:
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return value
    raise harmony.RecordError(f"{field}: expected a text or a non-empty list of messages, got {value!r:.60}")


def _plain(record: Any) -> Any:
    """Drops the null fields that columnar formats (Parquet) give every message, so absent means absent."""
    if isinstance(record, Mapping) and isinstance(record.get("messages"), list):
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m
                    for m in record["messages"]]
        return {**record, "messages": messages}
    return record


def pack(examples: list[Example], seq_len: int, *, overlong: str = "truncate", seed: int = 0,
         shuffle: str = "examples", process_index: int = 0, process_count: int = 1,
         stats: DataStats | None = None) -> PackedRows:
    """Packs the examples in order into rows of `seq_len` (an example goes to the next row when it does not fit)
    and gives this host every `process_count`-th row, the same number of rows on every host. `shuffle` (by
    `seed`): "examples" before packing; "rows" after packing, so that examples next to each other in the data
    share a row (and a batch); "none".

    An example longer than a row is cut to `seq_len` (overlong="truncate") or left out ("drop"); one left with
    nothing to train is dropped too. Both are counted in `stats`.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: expected one of {OVERLONG}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if shuffle not in SHUFFLE:
        raise ValueError(f"shuffle={shuffle!r}: expected one of {SHUFFLE}")
    stats = stats if stats is not None else DataStats()
    shuffled = np.random.default_rng(seed).permutation
    order = shuffled(len(examples)) if shuffle == "examples" else np.arange(len(examples))
    rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    used = seq_len  # room used in the row being filled (full: start a new one)
    for index in order:
        example = examples[index]
        inputs, targets, weights = example.tokens[:-1], example.tokens[1:], example.mask[1:]
        if len(inputs) > seq_len:
            if overlong == "drop" or not weights[:seq_len].any():
                stats.dropped += 1
                continue
            stats.truncated += 1
            inputs, targets, weights = inputs[:seq_len], targets[:seq_len], weights[:seq_len]
        if used + len(inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, targets, weights))
        used += len(inputs)
    if shuffle == "rows":
        rows = [rows[index] for index in shuffled(len(rows))]
    per_host = len(rows) // process_count
    mine = rows[process_index::process_count][:per_host]
    stats.rows_left_over = len(rows) - per_host * process_count
    stats.examples = sum(len(row) for row in mine)
    stats.rows = len(mine)
    packed = _to_arrays(mine, seq_len)
    stats.tokens = int((packed.segment_ids > 0).sum())
    return packed


def _to_arrays(rows, seq_len: int) -> PackedRows:
    shape = (len(rows), seq_len)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, (example_inputs, example_targets, example_weights) in enumerate(row, start=1):
            span = slice(start, start + len(example_inputs))
            inputs[r, span], targets[r, span], weights[r, span] = example_inputs, example_targets, example_weights
            segment_ids[r, span] = segment
            positions[r, span] = np.arange(len(example_inputs))
            start = span.stop
    return PackedRows(inputs, targets, weights, segment_ids, positions)


def load_rows(source: str | os.PathLike | Iterable[Mapping], seq_len: int, *, train_on: str = "assistant",
              overlong: str = "truncate", skip_invalid: bool = False, seed: int = 0, process_index: int = 0,
              process_count: int = 1, split: str = "train") -> tuple[PackedRows, DataStats]:
    """read_records -> encode_examples -> pack, with the statistics of all three (logged). `source`: a file,
    dataset directory or HF dataset id, or the records themselves (a list, a `datasets.Dataset`: "record N")."""
    stats = DataStats()
    if isinstance(source, str | os.PathLike):
        rows = read_records(source, split=split)
    else:
        rows = ((f"record {number}", record) for number, record in enumerate(source, start=1))
        source = f"{type(source).__name__} of records"
    examples = encode_examples(rows, train_on=train_on, skip_invalid=skip_invalid, stats=stats)
    rows = pack(examples, seq_len, overlong=overlong, seed=seed, process_index=process_index,
                process_count=process_count, stats=stats)
    log.info("%s: %s", source, stats.report())
    return rows, stats
