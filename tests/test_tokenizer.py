from gptoss_jax import tokenizer


def test_o200k_harmony_vocabulary_and_special_ids():
    encoding = tokenizer.get_encoding()
    assert encoding.name == "o200k_harmony"
    assert encoding.n_vocab == 201088
    for text, token in tokenizer.SPECIAL_TOKENS.items():
        assert encoding.encode_single_token(text) == token
        assert encoding.decode([token]) == text


def test_round_trip_of_a_harmony_message():
    encoding = tokenizer.get_encoding()
    text = "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    tokens = encoding.encode(text, allowed_special="all")
    assert tokens[0] == tokenizer.START and tokenizer.END in tokens and tokenizer.MESSAGE in tokens
    assert encoding.decode(tokens) == text
