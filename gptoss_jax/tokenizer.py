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


# ---- the released repositories' tokenizer files ----------------------------------------------------------------

BOS, PAD = "<|startoftext|>", "<|endoftext|>"
# What generation stops at in the released generation_config.json: <|return|>, <|endoftext|>, <|call|>.
GENERATION_STOPS = (RETURN, ENDOFTEXT, CALL)


def save_hf_tokenizer(directory: str | os.PathLike, max_length: int, chat_template: str | None = None) -> None:
    """Writes the tokenizer files the released gpt-oss repositories hold beside the weights, so that tools which
    load a model folder (transformers' AutoTokenizer, vLLM, SGLang, TGI) find them: `tokenizer.json` (this
    encoding as a Hugging Face `tokenizers` byte-level BPE: the same ids as tiktoken, tested on text of every
    script), `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json` (the stop tokens) and,
    given one, `chat_template.jinja` (`harmony.chat_template()`)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    (directory / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": "<|return|>", "pad_token": PAD}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False},
        indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": get_encoding().encode_single_token(BOS), "eos_token_id": list(GENERATION_STOPS),
        "pad_token_id": ENDOFTEXT, "do_sample": True}, indent=2) + "\n")


@functools.cache
def _tokenizer_json() -> str:
    """tokenizer.json of the encoding: tiktoken's regex split, then byte-level BPE over its ranks. A token's merges
    are its splits into two tokens, ranked by the token (then by the halves' ranks), as tiktoken merges the pair
    that makes the lowest-ranked token; `ignore_merges` takes a whole piece that is a token at once, as tiktoken
    does."""
    import json

    encoding = get_encoding()
    ranks = encoding._mergeable_ranks  # bytes -> id: tiktoken's BPE ranks, the ids of the ordinary tokens
    as_text = _byte_level_alphabet()

    def text(piece: bytes) -> str:
        return "".join(as_text[byte] for byte in piece)

    merges = []
    for token, rank in ranks.items():
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, left, right, token[:i], token[i:]) for left, right, i in sorted(splits)]
    merges.sort(key=lambda merge: merge[:3])
    added = [{"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for content, id_ in sorted(encoding._special_tokens.items(),
                                                                                  key=lambda item: item[1])]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": encoding._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(token): rank for token, rank in ranks.items()},
                  "merges": [[text(left), text(right)] for *_, left, right in merges]},
    }, ensure_ascii=False)


def _byte_level_alphabet() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE stands it for (GPT-2's mapping: printable Latin-1 bytes are
    themselves, the others the characters from U+0100 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(others)}}
