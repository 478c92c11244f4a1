"""GSM8K as harmony training records: an example reasoning dataset.

Each GSM8K row is `{"question", "answer"}`, the answer being worked steps with calculator annotations
(`<<48/2=24>>`) and a last line `#### <number>`. The record asks the question, puts the steps (annotations
removed) on the analysis channel and the number on the final channel:

    {"reasoning_effort": "medium",
     "messages": [{"role": "user", "content": question},
                  {"role": "assistant", "thinking": steps, "content": number}]}

Convert the copy beside the checkout with `python -m gptoss_jax.train.gsm8k ../shared/data/gsm8k/train.jsonl
gsm8k_harmony.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

_ANNOTATION = re.compile(r"<<[^>]*>>")


def gsm8k_record(row: dict[str, Any], *, reasoning_effort: str = "medium") -> dict[str, Any]:
    """One GSM8K row as a harmony record (raises ValueError on a row without a `#### answer` line)."""
    steps, separator, number = row["answer"].rpartition("####")
    if not separator or not number.strip():
        raise ValueError("answer has no '#### <number>' line")
    return {
        "reasoning_effort": reasoning_effort,
        "messages": [
            {"role": "user", "content": row["question"].strip()},
            {"role": "assistant", "thinking": _ANNOTATION.sub("", steps).strip(), "content": number.strip()},
        ],
    }


def convert(source: str | Path, destination: str | Path, *, reasoning_effort: str = "medium") -> int:
    """Converts a GSM8K JSONL file; returns the number of records written. A bad row raises `file:line: reason`."""
    count = 0
    with open(source, encoding="utf-8") as rows, open(destination, "w", encoding="utf-8") as out:
        for number, line in enumerate(rows, start=1):
            if not line.strip():
                continue
            try:
                record = gsm8k_record(json.loads(line), reasoning_effort=reasoning_effort)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{source}:{number}: not a GSM8K row ({error!s})") from None
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GSM8K JSONL -> harmony training records (JSONL)")
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--reasoning-effort", default="medium", choices=["low", "medium", "high"])
    args = parser.parse_args(argv)
    try:
        count = convert(args.source, args.destination, reasoning_effort=args.reasoning_effort)
    except OSError as error:  # a missing or unreadable file, named
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except ValueError as error:  # a bad row, as file:line: reason
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} records to {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
