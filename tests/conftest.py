import os
from pathlib import Path

# The offline copies of the o200k vocabulary that CI machines carry next to the checkout (see DESIGN.md §5).
_SHARED = Path(__file__).resolve().parents[2] / "shared"
if _SHARED.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED / "tiktoken_cache"))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_SHARED / "tokenizer"))

