import os
import subprocess
import sys

from gptoss_jax import tokenizer


def test_o200k_harmony_vocabulary_and_special_ids():
    encoding = tokenizer.get_encoding()
    assert encoding.name == "o200k_harmony"
    assert encoding.n_vocab == 201088
    for text, token in tokenizer.SPECIAL_TOKENS.items():
        assert encoding.encode_single_token(text) == token
        assert encoding.decode([token]) == text


def test_offline_with_no_cached_vocabulary_one_message_says_what_to_set(tmp_path):
    """No vocabulary in TIKTOKEN_CACHE_DIR and no way out (a proxy that refuses): not requests' traceback, one
    message naming the cache folder and the variable to set."""
    environment = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
                   "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", "from gptoss_jax import tokenizer\ntry:\n"
                             "    tokenizer.get_encoding()\nexcept OSError as error:\n    print(error)"],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith(f"the o200k_harmony vocabulary (tiktoken's o200k_base.tiktoken) is not in "
                                    f"{tmp_path} and could not be downloaded ("), result.stdout + result.stderr[-2000:]
    assert "set TIKTOKEN_CACHE_DIR" in result.stdout


def test_round_trip_of_a_harmony_message():
    encoding = tokenizer.get_encoding()
    text = "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    tokens = encoding.encode(text, allowed_special="all")
    assert tokens[0] == tokenizer.START and tokenizer.END in tokens and tokenizer.MESSAGE in tokens
    assert encoding.decode(tokens) == text
