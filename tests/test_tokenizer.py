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


def test_the_exported_hf_tokenizer_gives_tiktokens_ids_on_text_of_every_kind(tmp_path):
    """tokenizer.json (written beside merged exports) loaded by transformers' AutoTokenizer: the same ids as
    tiktoken's o200k_harmony, token for token, and the same text back, on harmony conversations, the demo's task,
    code, numbers, contractions, whitespace runs and many scripts and emoji."""
    import json

    import transformers

    from gptoss_jax import harmony, synthetic

    from harmony_cases import RECORDS

    tokenizer.save_hf_tokenizer(tmp_path, 131072)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    encoding = tokenizer.get_encoding()
    texts = [encoding.decode(harmony.encode_chat(record)) for record in RECORDS]
    texts += [json.dumps(record) for record in synthetic.counting_records(50, seed=4)]
    texts += ["Ünïcödé façade — naïve café 😀🚀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧", "日本語のテキスト、中文文本，한국어 텍스트",
              "عربي  עברית ελληνικά русский हिन्दी ไทย", "def f(x):\n\treturn x**2  # c\r\n\r\n   sp   \n\n\n",
              "  leading", "trailing  ", "1234567890 3.14159 1e-10 ½", "I'll you've we're THEY'LL don't",
              "\u00a0nbsp\u2009thin", "a" * 500, "<|reserved_200013|> <|endoftext|>x"]
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == encoding.encode(text, allowed_special="all"), text[:80]
        assert hf.decode(ids) == text
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [200002, 199999, 200012]


def test_round_trip_of_a_harmony_message():
    encoding = tokenizer.get_encoding()
    text = "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    tokens = encoding.encode(text, allowed_special="all")
    assert tokens[0] == tokenizer.START and tokenizer.END in tokens and tokenizer.MESSAGE in tokens
    assert encoding.decode(tokens) == text
