import os
import subprocess
import sys

import pytest

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


def test_the_exported_hf_tokenizer_gives_tiktokens_ids_and_its_chat_template_our_prompts(tmp_path):
    """tokenizer.json (written beside merged exports) loaded by transformers' AutoTokenizer: the same ids as
    tiktoken's o200k_harmony, token for token, and the same text back, on harmony conversations, the demo's task,
    code, numbers, contractions, whitespace runs and many scripts and emoji. Its chat template, through
    apply_chat_template (the record's fields as keyword arguments), renders every harmony parity record as
    `harmony.encode_chat` does: the same text, and the same ids except where a message's text spells a special
    token (a text template cannot tell `<|end|>` written by a user from the token; encode_chat can)."""
    import json

    import transformers

    from gptoss_jax import harmony, synthetic

    from harmony_cases import RECORDS, UNION

    tokenizer.save_hf_tokenizer(tmp_path, 131072, harmony.chat_template())
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
    spelled = 0
    formatted = {"messages": [{"role": "user", "content": "Who won?"}], "tools": [UNION], "response_format": {
        "type": "json_schema", "json_schema": {"name": "result", "description": "The winner.\nAnd by how much.",
                                               "schema": {"type": "object", "properties": {"w": {"type": "string"}}}}}}
    for record in [*RECORDS, formatted]:
        options = {key: record[key] for key in ("reasoning_effort", "current_date", "builtin_tools", "response_format")
                   if key in record}
        expected = harmony.encode_chat(record)
        assert hf.apply_chat_template(record["messages"], tools=record.get("tools"), add_generation_prompt=True,
                                      tokenize=False, **options) == encoding.decode(expected)
        ids = hf.apply_chat_template(record["messages"], tools=record.get("tools"), add_generation_prompt=True,
                                     **options)
        ids = list(ids if isinstance(ids, list) else ids["input_ids"])
        if any(special in json.dumps(record["messages"]) for special in tokenizer.SPECIAL_TOKENS):
            spelled += 1
        else:
            assert ids == expected
    assert spelled <= 2 and sum(bool(r.get("tools")) for r in RECORDS) >= 10  # functions of every schema shape
    late = [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be terse."}]  # as encode_chat refuses
    with pytest.raises(Exception, match=r"messages\[1\]: system messages must come before the conversation"):
        hf.apply_chat_template(late, tokenize=False)
    with pytest.raises(Exception, match=r"messages\[1\]: a tool result needs a 'name'"):
        hf.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "tool", "content": "1"}], tokenize=False)


def test_round_trip_of_a_harmony_message():
    encoding = tokenizer.get_encoding()
    text = "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    tokens = encoding.encode(text, allowed_special="all")
    assert tokens[0] == tokenizer.START and tokenizer.END in tokens and tokenizer.MESSAGE in tokens
    assert encoding.decode(tokens) == text
