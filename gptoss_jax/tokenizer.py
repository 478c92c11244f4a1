"""The o200k_harmony tokenizer of gpt-oss, and its special tokens by name.

`tiktoken` downloads the o200k vocabulary once and caches it (`TIKTOKEN_CACHE_DIR`); nothing here changes
where it looks.
"""

from __future__ import annotations

import functools
import os

import tiktoken

ENCODING_NAME = "o200k_harmony"

START = 200006  # <|start|>: opens a message header
END = 200007  # <|end|>: closes a message
MESSAGE = 200008  # <|message|>: separates the header from the content
CHANNEL = 200005  # <|channel|>: introduces the channel name (analysis, commentary, final)
CONSTRAIN = 200003  # <|constrain|>: introduces the content type of a tool call (json)
RETURN = 200002  # <|return|>: ends the final answer (in completions and training targets)
CALL = 200012  # <|call|>: ends a tool call
ENDOFTEXT = 199999  # <|endoftext|>

SPECIAL_TOKENS = {
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|channel|>": CHANNEL,
    "<|constrain|>": CONSTRAIN,
    "<|return|>": RETURN,
    "<|call|>": CALL,
    "<|endoftext|>": ENDOFTEXT,
}


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The o200k_harmony encoding (vocabulary of 201088 ids, special tokens included)."""
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except OSError as error:  # requests' errors are OSErrors: offline, with nothing in the cache
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "its default cache"
        raise TokenizerUnavailable(
            f"the {ENCODING_NAME} vocabulary (tiktoken's o200k_base.tiktoken) is not in {cache} and could not be "
            f"downloaded ({type(error).__name__}); offline, set TIKTOKEN_CACHE_DIR to a folder that holds tiktoken's "
            "cache of it (this repository's offline machines: ../shared/tiktoken_cache)") from None


class TokenizerUnavailable(OSError):
    """The vocabulary is neither cached nor downloadable."""
