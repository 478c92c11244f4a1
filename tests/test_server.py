"""The OpenAI-compatible server, in its own process on 127.0.0.1, driven by the real `openai` client."""

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import jsonschema
import numpy as np
import openai
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gptoss_jax
from gptoss_jax import constrain, harmony, synthetic
from gptoss_jax import tokenizer as tok
from gptoss_jax.generation import DEFAULT_STOP_TOKENS, Generator
from gptoss_jax.lora import LoraConfig, add_lora, save_peft_adapter
from gptoss_jax.model import LoRAParam
from gptoss_jax.protocol import Completion, parse_request

from helpers import free_ports, serving, wait_until_healthy
from hf_models import bigram_hf_model, random_hf_model

QUESTION = "Count the rs, starting again from zero at every x: r, s, x, r, r, a, t, r, o, x, r, e."
API_KEY = "sk-test-key"  # the module's server requires it
MAX_REQUEST_BYTES = 1_000_000
AUTHORIZED = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "serve.log"


@pytest.fixture(scope="module")
def server(demo_model_dir, server_log):
    with serving(demo_model_dir, "--slots", "4", "--max-context", "512", "--api-key", API_KEY,
                 "--max-request-bytes", str(MAX_REQUEST_BYTES), log=server_log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def generator(demo_model_dir):
    return Generator(gptoss_jax.load_model(demo_model_dir, dtype="float32"))


def _expected(generator, messages, effort="medium", max_tokens=80):
    """What gptoss_jax.generate gives for the same conversation at temperature 0, as (reasoning, content)."""
    prompt = harmony.encode_chat({"messages": messages, "reasoning_effort": effort})
    tokens = generator.generate([prompt], max_tokens)[0]
    result = harmony.parse(tokens, role="assistant")
    messages = result.messages + ([result.partial] if result.partial else [])
    return ("".join(m.text for m in messages if m.channel == "analysis"),
            "".join(m.text for m in messages if m.channel == "final"))


def _ask(client, content, effort="medium", **extra):
    settings = {"temperature": 0, "max_tokens": 80, **extra}
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                          reasoning_effort=effort, **settings)


def test_greedy_completion_equals_generate(client, generator):
    response = _ask(client, QUESTION)
    message = response.choices[0].message
    reasoning, content = _expected(generator, [{"role": "user", "content": QUESTION}])
    assert content and reasoning  # the demo model writes both channels
    assert (message.reasoning_content, message.content) == (reasoning, content)
    finish = response.choices[0].finish_reason
    assert finish == "stop" or (finish == "length" and response.usage.completion_tokens == 80)
    assert response.usage.completion_tokens > 0 and response.usage.prompt_tokens == len(
        harmony.encode_chat({"messages": [{"role": "user", "content": QUESTION}]}))


def test_the_analysis_also_comes_back_as_reasoning(client):
    """OpenAI's gpt-oss eval client (`ChatCompletionsSampler`) reads `getattr(choice.message, "reasoning", None)`:
    the analysis is under both names, whole and streamed."""
    message = _ask(client, QUESTION).choices[0].message
    assert message.reasoning_content and getattr(message, "reasoning", None) == message.reasoning_content
    streamed = "".join(getattr(chunk.choices[0].delta, "reasoning", None) or ""
                       for chunk in _ask(client, QUESTION, stream=True))
    assert streamed == message.reasoning_content


def test_streamed_deltas_add_up_to_the_whole_answer(client):
    whole = _ask(client, QUESTION).choices[0].message
    reasoning, content, finish = "", "", None
    for chunk in _ask(client, QUESTION, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content) == (whole.reasoning_content, whole.content)
    assert finish == _ask(client, QUESTION).choices[0].finish_reason


def test_each_reasoning_effort_reaches_the_prompt(client, generator):
    """Each effort's content tokens, their log probabilities and the 3 most likely tokens at each are the model's
    for the prompt rendered with that effort. Only the tokens of `content` are reported, as OpenAI's: not the
    analysis, nor the harmony tokens around the answer."""
    model, seen, encoding = generator.model, {}, tok.get_encoding()
    for effort in harmony.EFFORTS:
        response = _ask(client, QUESTION, effort, logprobs=True, top_logprobs=3)
        reported = response.choices[0].logprobs.content
        prompt = harmony.encode_chat({"messages": [{"role": "user", "content": QUESTION}], "reasoning_effort": effort})
        tokens = generator.generate([prompt], 80)[0]
        completion = Completion([])
        content = [i for i, token in enumerate(tokens) if (completion.feed(token), completion.in_content)[1]]
        assert 0 < len(content) < len(tokens) - 5  # the analysis and the headers are most of it
        assert "".join(item.token for item in reported) == response.choices[0].message.content
        assert [bytes(item.bytes) for item in reported] == [encoding.decode_single_token_bytes(tokens[i])
                                                            for i in content]
        logits = np.asarray(model(np.asarray([prompt + tokens[:-1]], np.int32)))[0, len(prompt) - 1:]
        logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        np.testing.assert_allclose([item.logprob for item in reported], logprobs[content, np.asarray(tokens)[content]],
                                   atol=1e-4)
        for item, position in zip(reported, content, strict=True):
            likeliest = np.argsort(-logprobs[position])[:3]
            assert [bytes(other.bytes) for other in item.top_logprobs] == [
                encoding.decode_single_token_bytes(int(t)) for t in likeliest]
            np.testing.assert_allclose([other.logprob for other in item.top_logprobs], logprobs[position, likeliest],
                                       atol=1e-4)
        seen[effort] = tuple(round(item.logprob, 4) for item in reported)
    assert len(set(seen.values())) == 3  # the effort changes the prompt, and so the probabilities


def test_sixteen_concurrent_requests_are_all_answered_correctly(client, generator):
    questions = [record["messages"][0]["content"] for record in synthetic.counting_records(16, seed=2)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda q: _ask(client, q).choices[0].message, questions))
    for question, message in zip(questions, responses, strict=True):
        assert (message.reasoning_content, message.content) == _expected(
            generator, [{"role": "user", "content": question}])


def test_tool_call_round_trip(client):
    tools = [{"type": "function", "function": {"name": "add", "description": "Adds two numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]
    messages = [
        {"role": "user", "content": "What is 2 + 5?"},
        {"role": "assistant", "content": None, "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":5}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"},
    ]
    response = client.chat.completions.create(model="demo", messages=messages, tools=tools, temperature=0,
                                              max_tokens=40)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    messages[1]["reasoning"] = messages[1].pop("reasoning_content")  # the name newer vLLM and OpenAI's evals use
    again = client.chat.completions.create(model="demo", messages=messages, tools=tools, temperature=0, max_tokens=40)
    assert again.usage.prompt_tokens == response.usage.prompt_tokens
    assert response.usage.prompt_tokens == len(harmony.encode_chat({"messages": [
        {"role": "user", "content": "What is 2 + 5?"},
        {"role": "assistant", "thinking": "Use the tool.",
         "tool_calls": [{"id": "call_1", "function": {"name": "add", "arguments": '{"a":2,"b":5}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"}], "tools": tools}))


def test_generated_tool_calls_come_back_as_tool_calls():
    """The model's `<|call|>` messages become OpenAI tool_calls with their JSON arguments."""
    encoding = tok.get_encoding()
    tokens = [*harmony.render_message(harmony.Message("assistant", "Call add.", "analysis"))[0][2:],
              *harmony.render_message(harmony.Message("assistant", '{"a": 2, "b": 5}', "commentary", "functions.add",
                                                      "<|constrain|>json"))[0]]
    completion = Completion(stops=[])
    deltas = [completion.feed(token) for token in tokens]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Call add."
    assert not any("content" in d for d in deltas)
    (call,) = completion.tool_calls()
    assert call["type"] == "function" and call["function"] == {"name": "add", "arguments": '{"a": 2, "b": 5}'}
    assert encoding.decode(tokens[:2]) == "<|channel|>analysis"


def test_with_a_response_format_content_is_the_final_channel_alone():
    """A commentary preamble is shown as content normally; with a response format it would break the JSON."""
    tokens = [*harmony.render_message(harmony.Message("assistant", "Looking it up.", "commentary"))[0][2:],
              *harmony.render_message(harmony.Message("assistant", '{"count":3}', "final"), end=tok.RETURN)[0]]
    for final_only, content in ((False, 'Looking it up.{"count":3}'), (True, '{"count":3}')):
        completion = Completion(stops=[], final_only=final_only)
        assert "".join(completion.feed(token).get("content", "") for token in tokens) == content


# A call the bigram model below makes whatever it is asked: arguments whose tokens do not repeat.
CALL = '{"n":7}'
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds.", "parameters": {
    "type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}}}]


@pytest.fixture(scope="module")
def tool_caller(tmp_path_factory):
    """A server on a model that answers every prompt with a call to functions.add (greedy)."""
    directory = tmp_path_factory.mktemp("caller")
    assistant = harmony.encode_chat({"messages": [{"role": "user", "content": "x"}]})[-1]
    call = harmony.render_message(harmony.Message("assistant", CALL, "commentary", "functions.add",
                                                  "<|constrain|>json"))[0][2:]  # after <|start|>assistant
    bigram_hf_model([assistant, *call], num_hidden_layers=2).save_pretrained(directory)
    with serving(directory, "--slots", "2", "--max-context", "256") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_a_generated_call_comes_back_as_tool_calls(tool_caller):
    messages = [{"role": "user", "content": "Add seven."}]
    for parallel in (True, False):  # one call per turn either way: gpt-oss ends its turn at a call
        choice = tool_caller.chat.completions.create(model="demo", messages=messages, tools=TOOLS, temperature=0,
                                                     max_tokens=40, parallel_tool_calls=parallel).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert (call.type, call.function.name, call.function.arguments) == ("function", "add", CALL)
    chunks = list(tool_caller.chat.completions.create(model="demo", messages=messages, tools=TOOLS, temperature=0,
                                                      max_tokens=40, stream=True))
    streamed = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [("add", CALL)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_strict_tool_arguments_are_held_to_the_parameters(tool_caller):
    """The model calls add with {"n":7}; a strict tool whose n is at most 5 gets arguments that validate."""
    parameters = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 5}},
                  "required": ["n"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Add seven."}]
    for strict in (True, False):
        tools = [{"type": "function", "function": {"name": "add", "description": "Adds.", "parameters": parameters,
                                                   "strict": strict}}]
        choice = tool_caller.chat.completions.create(model="demo", messages=messages, tools=tools, temperature=0,
                                                     max_tokens=40).choices[0]
        (call,) = choice.message.tool_calls
        if strict:
            jsonschema.validate(json.loads(call.function.arguments), parameters)
            assert choice.finish_reason == "tool_calls"
        else:
            assert call.function.arguments == CALL  # not strict: what the model writes


def test_tool_choice_none_is_honoured_and_forced_calls_are_refused(tool_caller):
    messages = [{"role": "user", "content": "Add seven."}]
    response = tool_caller.chat.completions.create(model="demo", messages=messages, tools=TOOLS, temperature=0,
                                                   max_tokens=40, tool_choice="none")
    assert response.usage.prompt_tokens == len(harmony.encode_chat({"messages": messages}))  # no tools rendered
    assert not response.choices[0].message.tool_calls and response.choices[0].finish_reason == "stop"
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        with pytest.raises(openai.BadRequestError, match="tool_choice: .* is not supported"):
            tool_caller.chat.completions.create(model="demo", messages=messages, tools=TOOLS, tool_choice=choice)
    with pytest.raises(openai.BadRequestError, match='parallel_tool_calls: expected a boolean, got "yes"'):
        tool_caller.chat.completions.create(model="demo", messages=messages, tools=TOOLS,
                                            extra_body={"parallel_tool_calls": "yes"})


COUNT_SCHEMA = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 12}},
                "required": ["count"], "additionalProperties": False}
COUNT_FORMAT = {"type": "json_schema", "json_schema": {"name": "count", "schema": COUNT_SCHEMA, "strict": True}}


def test_response_format_holds_the_answer_and_leaves_the_reasoning_free(client, generator):
    """The demo model answers in words; asked for a JSON schema it answers in it, with the analysis it writes
    anyway, exactly as `Generator.generate` constrains it (greedy), streamed or not."""
    record = {"messages": [{"role": "user", "content": QUESTION}], "reasoning_effort": "medium",
              "response_format": COUNT_FORMAT}
    prompt = harmony.encode_chat(record)
    free = harmony.parse(generator.generate([prompt], 120)[0], role="assistant").messages
    held = harmony.parse(generator.generate([prompt], 120, constraints=constrain.RowConstraints(
        [constrain.for_response_format(COUNT_FORMAT)]))[0], role="assistant").messages
    assert [m.channel for m in free] == [m.channel for m in held] == ["analysis", "final"]
    assert free[0].text == held[0].text  # the analysis is the model's own
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):  # free, the answer is not JSON
        jsonschema.validate(json.loads(free[1].text), COUNT_SCHEMA)

    response = _ask(client, QUESTION, max_tokens=120, response_format=COUNT_FORMAT)
    message = response.choices[0].message
    jsonschema.validate(json.loads(message.content), COUNT_SCHEMA)
    assert (message.content, message.model_extra["reasoning_content"]) == (held[1].text, held[0].text)
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens == len(prompt)  # the format is in the developer message

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # beside free requests in the other slots
        asked = [pool.submit(_ask, client, QUESTION, effort, max_tokens=120) for effort in ("low", "high")]
        held_again = pool.submit(_ask, client, QUESTION, max_tokens=120, response_format=COUNT_FORMAT)
        for effort, future in zip(("low", "high"), asked, strict=True):
            message_free = future.result().choices[0].message
            assert (message_free.model_extra["reasoning_content"] or "", message_free.content) == _expected(
                generator, [{"role": "user", "content": QUESTION}], effort, max_tokens=120)
        assert held_again.result().choices[0].message.content == message.content

    chunks = list(_ask(client, QUESTION, max_tokens=120, response_format=COUNT_FORMAT, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(d.content or "" for d in deltas) == message.content
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == held[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_cut_the_content_and_end_the_request(client):
    whole = _ask(client, QUESTION).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    expected = whole[:whole.index(stop)]
    response = _ask(client, QUESTION, stop=[stop, "never-seen"])
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (expected, "stop")
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in _ask(client, QUESTION, stop=stop,
                                                                                    stream=True))
    assert streamed == expected


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """`serve --lora` on a random base (real vocabulary: its tokens seldom stop) with a random PEFT adapter, and
    the same model in this process, adapter attached."""
    root = tmp_path_factory.mktemp("adapted")
    random_hf_model(seed=5, num_hidden_layers=2, vocab_size=201088).save_pretrained(root / "base")
    model = gptoss_jax.load_model(root / "base", dtype="float32")
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=("*",)), rngs=nnx.Rngs(1))
    state = nnx.state(model, LoRAParam)
    nnx.update(model, jax.tree.map(lambda a: a + 0.3 * np.random.default_rng(0).normal(size=a.shape), state))
    save_peft_adapter(model, root / "adapter")
    with serving(root / "base", "--lora", str(root / "adapter"), "--slots", "2", "--max-context", "2048") as url:
        yield url, Generator(model), Generator(gptoss_jax.load_model(root / "base", dtype="float32"))


def _token_text(token: int) -> str:
    """A token as the legacy completions API names it in its logprobs: its text, or vLLM's `bytes:\\xNN...` for
    bytes that are not text alone."""
    raw = tok.get_encoding().decode_single_token_bytes(token)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def _tokens(url, messages, **settings):
    """Every token generated after the conversation's harmony prompt (/v1/completions on its token ids: the chat
    API reports only the content's tokens, and this random model writes no well-formed harmony)."""
    prompt = harmony.encode_chat({"messages": messages})
    status, reply = _post(url, json.dumps({"prompt": prompt, "logprobs": 0, **settings}).encode(),
                          path="/v1/completions")
    assert status == 200, reply
    return reply["choices"][0]["logprobs"]["tokens"]


def test_served_adapter_and_sampling_equal_generate(adapted):
    """`serve --lora` answers with the adapted model; sampled decoding (temperature, top_p, top_k, seed) draws
    the tokens `Generator.generate` draws with the same settings."""
    url, generator, base = adapted
    messages = [{"role": "user", "content": "Tell me a story."}]
    prompt = harmony.encode_chat({"messages": messages})

    def expected(generator, **settings):
        return [_token_text(t) for t in generator.generate([prompt], 12, **settings)[0]]

    assert _tokens(url, messages, temperature=0, max_tokens=12) == expected(generator)
    assert expected(generator) != expected(base)  # the adapter changes the answer
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 11}
    assert _tokens(url, messages, max_tokens=12, **sampled) == expected(generator, **sampled)
    assert expected(generator, **sampled) != expected(generator, **{**sampled, "seed": 12})


def test_n_choices_draw_with_seeds_seed_plus_i_and_stream_by_index(adapted):
    """n = 3 sampled choices through the openai client: choice i draws what `generate` draws with seed + i (the
    three share one prefill in the engine); streamed, each index's deltas add up to that choice's answer."""
    url, generator, _ = adapted
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story."}]
    prompt = harmony.encode_chat({"messages": messages})
    settings = {"temperature": 1.0, "max_tokens": 10, "seed": 5, "n": 3}
    response = client.chat.completions.create(model="demo", messages=messages, **settings)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    expected = [generator.generate([prompt], 10, temperature=1.0, seed=5 + i)[0] for i in range(3)]
    assert len({tuple(tokens) for tokens in expected}) == 3
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == sum(map(len, expected))
    # the same draws through the text completions API (every token reported), choice i with seed + i
    raw = client.completions.create(model="demo", prompt=prompt, logprobs=0, **settings)
    assert [choice.logprobs.tokens for choice in raw.choices] == [[_token_text(t) for t in tokens]
                                                                  for tokens in expected]
    streamed = {(i, field): "" for i in range(3) for field in ("content", "reasoning")}
    for chunk in client.chat.completions.create(model="demo", messages=messages, stream=True, **settings):
        for choice in chunk.choices:
            for field in ("content", "reasoning"):
                streamed[choice.index, field] += getattr(choice.delta, field, None) or ""
    assert streamed == {(c.index, field): getattr(c.message, field) or "" for c in response.choices
                        for field in ("content", "reasoning")}


def test_a_client_that_leaves_frees_its_slot(adapted):
    """A streamed request for 1900 tokens (minutes of decoding here) whose client disconnects while it decodes is
    cancelled: its slot frees within seconds."""
    url, _, _ = adapted
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Go on."}],
                                            temperature=1.0, max_tokens=1900, stream=True)
    next(iter(stream))  # the first chunk (the role): sent before the engine admits the request
    deadline = time.time() + 120  # admitting it may compile first (minutes on a loaded machine)
    while not json.loads(urllib.request.urlopen(url + "/health").read())["busy_slots"] and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert json.loads(urllib.request.urlopen(url + "/health").read())["busy_slots"] == 1  # decoding
    stream.close()
    deadline = time.time() + 10
    while json.loads(urllib.request.urlopen(url + "/health").read())["busy_slots"] and time.time() < deadline:
        time.sleep(0.2)
    assert json.loads(urllib.request.urlopen(url + "/health").read())["busy_slots"] == 0


@pytest.mark.parametrize("stops, content", [(["o w"], "Hell"), (["fine!"], "Hello world, this is fine."),
                                             (["is f", "s fine"], "Hello world, this "),
                                             (["s fine", "is f"], "Hello world, this "), ([], None)])
def test_streamed_content_never_runs_past_a_stop_string(stops, content):
    """A stop string may span tokens: text that could begin one is held back until the next tokens tell, so the
    deltas add up to the content before the stop (or, at the end, to all of it). Overlapping stops cut at the
    earliest match, whatever their order in the list."""
    text = "Hello world, this is fine."
    tokens = harmony.render_message(harmony.Message("assistant", text, "final"))[0][2:]
    completion = Completion(stops)
    streamed = "".join(completion.feed(token).get("content", "") for token in tokens)
    streamed += completion.rest().get("content", "")
    assert streamed == completion.content == (content or text)
    assert completion.stopped == (content is not None and content != text)


def test_spec_fields_at_their_defaults_are_accepted_and_other_values_named():
    """What the openai client and other libraries send by default (penalties at 0, metadata, store, user, service
    tier) is accepted; a spec field at a value the server cannot honour, and a name outside the spec, is a 400."""
    from gptoss_jax.protocol import BadRequest

    messages = [{"role": "user", "content": "hi"}]
    plain = parse_request({"messages": messages}, 512)
    labelled = parse_request({"messages": messages, "frequency_penalty": 0, "presence_penalty": 0.0,
                              "logit_bias": {}, "metadata": {"run": "a"}, "store": False, "user": "u",
                              "service_tier": "auto", "modalities": ["text"]}, 512)
    assert labelled[0] == plain[0] and labelled[1].keys() == plain[1].keys()
    for field, value in (("modalities", ["audio"]), ("functions", [{"name": "f"}])):
        with pytest.raises(BadRequest, match=f"^{field}: .* is not supported"):
            parse_request({"messages": messages, field: value}, 512)
    for field, value, message in (("frequency_penalty", 2.5, r"expected a number in \[-2.0, 2.0\]"),
                                  ("logit_bias", {"x": 1}, r"'x' is not a token id in \[0, 201088\)"),
                                  ("logit_bias", {"5": 101}, r"\['5'\]: expected a number in \[-100, 100\]"),
                                  ("n", 0, r"expected an integer in \[1, 64\]")):
        with pytest.raises(BadRequest, match=f"^{field}.*{message}"):
            parse_request({"messages": messages, field: value}, 512)
    honoured = parse_request({"messages": messages, "presence_penalty": 0.5, "logit_bias": {"17": -100}, "n": 3},
                             512)[1]
    assert (honoured["presence_penalty"], honoured["logit_bias"], honoured["n"]) == (0.5, {17: -100}, 3)
    with pytest.raises(BadRequest, match="unknown field 'colour'"):
        parse_request({"messages": messages, "colour": 1}, 512)
    # the JSON type the spec gives each field, never coerced (each of these used to be accepted as another value)
    for field, value, message in (("stream", "false", 'expected a boolean, got "false"'),
                                  ("logprobs", "no", 'expected a boolean, got "no"'),
                                  ("max_tokens", 1.5, "expected an integer, got 1.5"),
                                  ("top_k", 2.5, "expected an integer, got 2.5"),
                                  ("seed", 7.9, "expected an integer, got 7.9"),
                                  ("model", 5, "expected a string, got 5"),
                                  ("stream_options", "x", 'expected an object, got "x"'),
                                  ("stream_options", {"include_usage": "yes"}, 'expected a boolean, got "yes"'),
                                  ("n", True, "expected an integer, got true")):
        with pytest.raises(BadRequest, match=f"^{field}.*: {message}$"):
            parse_request({"messages": messages, field: value}, 512)
    with pytest.raises(BadRequest, match=r"^tools\[0\].function.parameters\[\"properties\"\]: not a JSON Schema: "
                                         r"5 is not of type 'object'$"):
        parse_request({"messages": messages, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "objecty", "properties": 5}}}]}, 512)


def _post(server, body: bytes, headers=AUTHORIZED, path="/v1/chat/completions"):
    request = urllib.request.Request(server + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post_expecting_continue(server, body: bytes):
    """A POST as careful clients send large bodies (curl does): `Expect: 100-continue`, and the body only after
    the server's go-ahead. A server that refuses from the headers then answers before any of the body is sent;
    sent at once instead, a refusal that closes the connection can reach the client as a broken pipe while it
    is still writing (urllib's behaviour: it made this test fail now and then)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as connection:
        connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                           "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        stream = connection.makefile("rb")
        status = int(stream.readline().split()[1])
        if status == 100:  # go ahead
            stream.readline()
            connection.sendall(body)
            status = int(stream.readline().split()[1])
        headers = {}
        while line := stream.readline().strip():
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, json.loads(stream.read(int(headers["content-length"])))


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    status, body = _post(server, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, json.dumps({"messages": [{"role": "user", "content": "hi"}], "colour": 1}).encode())
    assert status == 400 and "unknown field 'colour'" in body["error"]["message"]
    assert (body["error"]["type"], body["error"]["param"], body["error"]["code"]) == (
        "invalid_request_error", "colour", None)  # OpenAI's error shape: the field at fault, a string code or null
    status, body = _post(server, json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode())
    assert status == 400 and "messages[0].role" in body["error"]["message"]
    assert body["error"]["param"] == "messages[0].role"
    status, body = _post(server, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": "9"}).encode())
    assert (status, body["error"]["param"]) == (400, "max_tokens")
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist") as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert raised.value.body == {"message": raised.value.body["message"], "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        client.responses.create(model="gpt-4o", input="hi", max_output_tokens=1)
    status, body = _post(server, json.dumps({"model": 5, "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert (status, body["error"]["param"]) == (400, "model")  # the wrong type is the parser's 400
    with pytest.raises(openai.BadRequestError, match="this server's context holds 512"):
        _ask(client, "word " * 600)
    with pytest.raises(openai.BadRequestError, match=r"response_format.json_schema.schema: .*strng"):
        _ask(client, QUESTION, response_format={"type": "json_schema", "json_schema": {
            "name": "a", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}})
    with pytest.raises(openai.BadRequestError, match="response_format: expected"):
        _ask(client, QUESTION, response_format={"type": "yaml"})
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\].function.parameters: .*uniqueItems"):
        _ask(client, QUESTION, tools=[{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}])
    assert _ask(client, QUESTION).choices[0].message.content  # still serving
    with urllib.request.urlopen(urllib.request.Request(server + "/v1/models", headers=AUTHORIZED)) as response:
        assert [(m["id"], m["object"], m["max_model_len"]) for m in json.loads(response.read())["data"]] == [
            ("demo", "model", 512)]


def test_the_samplers_of_openai_gpt_oss_evals_run_unmodified(client):
    """What OpenAI's gpt-oss eval client (`python -m gpt_oss.evals --sampler chat_completions|responses`, gpt-oss
    0.0.9's gpt_oss/evals/*_sampler.py; the package needs Python >= 3.12) sends: `max_tokens` 131,072 at every
    effort (its --max-tokens default is 32,768), or a Responses request with only `reasoning`. A budget past the room
    the prompt leaves is capped at that room (it was a 400): the sampler gets an answer, with content (an empty one
    it retries for ever) and `reasoning`, and a reply that fills the room ends "length"."""
    messages = [{"role": "user", "content": QUESTION}]
    for effort in ("low", "high"):
        reply = client.chat.completions.create(model="demo", messages=messages, reasoning_effort=effort,
                                               temperature=1.0, max_tokens=131_072)
        assert reply.choices[0].message.content and reply.choices[0].message.reasoning
        answer = client.responses.create(model="demo", input=list(messages), reasoning={"effort": effort})
        assert answer.output_text and answer.status == "completed"
    unsure = client.responses.create(model="demo", input=list(messages), temperature=1.0, max_output_tokens=131_072)
    assert unsure.output_text
    # no way to stop (<|return|>, <|call|> and <|end|> banned): the reply fills the room and ends "length"
    endless = {str(t): -100 for t in (200002, 200012, 200007)}
    long_prompt = [{"role": "user", "content": "word " * 300}]
    reply = client.chat.completions.create(model="demo", messages=long_prompt, temperature=0, max_tokens=131_072,
                                           logit_bias=endless)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 512


def test_text_completions_continue_raw_tokens_and_score_echoed_prompts(client, generator):
    """/v1/completions, no harmony rendering: a prompt given as text (special tokens included) is continued as
    `generate` continues its tokens; with echo and logprobs every prompt token after the first is scored with the
    model's log-softmax, each position's top-k dict holds the chosen token too, offsets index the text. Several
    prompts (text and ids) with n choices each come back in order; max_tokens 0 with echo only scores; a stop
    string cuts the text; streamed chunks add up to the whole, logprobs included."""
    encoding, model = tok.get_encoding(), generator.model
    prompt = harmony.encode_chat({"messages": [{"role": "user", "content": QUESTION}], "reasoning_effort": "low"})
    text = encoding.decode(prompt)
    reply = client.completions.create(model="demo", prompt=text, max_tokens=24, temperature=0, logprobs=2, echo=True)
    expected = generator.generate([prompt], 24)[0]
    choice, sequence = reply.choices[0], prompt + expected
    assert choice.text == text + encoding.decode([t for t in expected if t not in DEFAULT_STOP_TOKENS])
    assert choice.finish_reason == ("stop" if expected[-1] in DEFAULT_STOP_TOKENS else "length")
    scores = choice.logprobs
    assert scores.tokens == [_token_text(t) for t in sequence]
    assert scores.token_logprobs[0] is None and scores.top_logprobs[0] is None
    logits = np.asarray(model(np.asarray([sequence[:-1]], np.int32)))[0]
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(scores.token_logprobs[1:], logprobs[np.arange(len(sequence) - 1), sequence[1:]],
                               atol=1e-4)
    for position, top in enumerate(scores.top_logprobs[1:]):
        likeliest = np.argsort(-logprobs[position])[:2]
        assert set(top) == {_token_text(int(t)) for t in likeliest} | {scores.tokens[position + 1]}
        assert max(top.values()) == pytest.approx(logprobs[position, likeliest[0]], abs=1e-4)
    assert scores.text_offset == [len(encoding.decode(sequence[:i])) for i in range(len(sequence))]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(expected))

    other = encoding.encode("Count the rs: r, r, x.")
    several = client.completions.create(model="demo", prompt=[prompt, encoding.decode(other)], n=2, max_tokens=6,
                                        temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert [c.text for c in several.choices] == [encoding.decode([t for t in g if t not in DEFAULT_STOP_TOKENS])
                                                 for g in generator.generate([prompt, other], 6) for _ in range(2)]
    scored = client.completions.create(model="demo", prompt=other, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == encoding.decode(other) and scored.usage.completion_tokens == 0
    assert len(scored.choices[0].logprobs.token_logprobs) == len(other)
    words = encoding.decode(expected[:12])
    stop = words[len(words) // 2:][:3]
    cut = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == words[: words.index(stop)] and cut.choices[0].finish_reason == "stop"
    # stop strings apply to the generated text only, not to an echoed prompt holding one; harnesses send many
    in_prompt = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, echo=True,
                                          stop=["<|start|>", *(f"never{i}" for i in range(8)), stop])
    assert in_prompt.choices[0].text == text + words[: words.index(stop)]
    streamed = list(client.completions.create(model="demo", prompt=text, max_tokens=24, temperature=0, logprobs=2,
                                              echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert sum((c.choices[0].logprobs.tokens for c in streamed), []) == scores.tokens
    assert streamed[-1].choices[0].finish_reason == choice.finish_reason


def test_the_tokenizer_endpoints_tokenize_as_prompts_are(server):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, which lm-eval finds and counts its tokens with."""
    text = "<|start|>user<|message|>Hello, world: 12345"
    status, reply = _post(server, json.dumps({"prompt": text, "add_special_tokens": False}).encode(),
                          path="/tokenize")
    tokens = tok.get_encoding().encode(text, allowed_special="all")
    assert (status, reply) == (200, {"count": len(tokens), "max_model_len": 512, "tokens": tokens})
    assert _post(server, json.dumps({"tokens": tokens}).encode(), path="/detokenize") == (200, {"prompt": text})
    status, reply = _post(server, json.dumps({"tokens": [-1]}).encode(), path="/detokenize")
    assert (status, reply["error"]["param"]) == (400, "tokens")
    with urllib.request.urlopen(server + "/tokenizer_info") as response:
        info = json.loads(response.read())
    assert info["eos_token"] == "<|return|>" and info["chat_template"] == harmony.chat_template()


def test_lm_eval_local_completions_loglikelihood_equals_the_models(server, generator, tmp_path, monkeypatch):
    """lm-eval's `local-completions` on a tiny multiple-choice task, unmodified (its tokenizer: this server's, found
    through /tokenizer_info and /tokenize; batches of 4 prompts a request): each choice's loglikelihood is the sum
    of the model's log-softmax over the choice's tokens after the question, and acc follows from them."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    docs = [{"question": f"How many rs in {word}?", "choices": ["one", "two", "three"], "label": label}
            for word, label in (("car", 0), ("error", 2), ("mirror", 2), ("carry", 1))]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "docs.jsonl"}
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
""")
    results = lm_eval.simple_evaluate(
        model="local-completions", model_args=f"base_url={server}/v1/completions,model=demo,batch_size=4",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    encoding, model = tok.get_encoding(), generator.model
    correct = []
    for sample in sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        context = f"Q: {doc['question']}\nA:"
        expected = []
        for choice in doc["choices"]:
            whole = encoding.encode(context + " " + choice)
            start = len(encoding.encode(context))
            logprobs = np.asarray(jax.nn.log_softmax(model(np.asarray([whole[:-1]], np.int32))[0], axis=-1))
            expected.append(float(sum(logprobs[i - 1, whole[i]] for i in range(start, len(whole)))))
        got = [response[0][0] if isinstance(response[0], list | tuple) else response[0]
               for response in sample["filtered_resps"]]
        np.testing.assert_allclose(got, expected, atol=1e-3)
        correct.append(int(np.argmax(expected)) == doc["label"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_the_log_says_where_it_listens_and_each_request(server, client, server_log):
    """The startup lines (what is served, as which name, where) and uvicorn's access log, one line a request."""
    _ask(client, "hi", max_tokens=1)
    log = server_log.read_text()
    port = server.rsplit(":", 1)[1]
    assert f"as demo on http://127.0.0.1:{port}/v1: 4 slots, 512 tokens of context each" in log
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log
    assert re.search(r'"POST /v1/chat/completions HTTP/1.1" 200', log), log[-2000:]


def test_the_api_key_body_limit_and_unknown_paths_answer_in_the_apis_error_format(server):
    """Without the key (or with another) every /v1/ path is a 401, /health stays open; a body past
    --max-request-bytes is a 413 before it is read whole; an unknown path is a JSON 404; a client that leaves
    half-way through sending its body does not stop the server."""
    hello = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for path in ("/v1/chat/completions", "/v1/responses"):
            status, body = _post(server, hello, headers=headers, path=path)
            assert status == 401 and body["error"]["type"] == "authentication_error", (headers, body)
    with urllib.request.urlopen(server + "/health", timeout=30) as response:
        assert response.status == 200
    big = json.dumps({"messages": [{"role": "user", "content": "w" * MAX_REQUEST_BYTES}]}).encode()
    status, body = _post_expecting_continue(server, big)
    assert status == 413 and f"at most {MAX_REQUEST_BYTES}" in body["error"]["message"]
    status, body = _post(server, hello, path="/v1/embeddings")
    assert status == 404 and "/v1/embeddings" in body["error"]["message"]
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as half:  # promises 1000 bytes, sends 10, leaves
        half.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"".encode())
    status, body = _post(server, hello)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


def test_two_process_server_answers_like_one_process(tmp_path):
    """Process 0 serves HTTP and broadcasts each step; process 1 follows (127.0.0.1, gloo, one 4-device mesh). On
    the model that calls functions.add with `CALL`: a plain request, and one whose strict tool asks for other
    arguments (its constraint goes to process 1 in the plan, which masks the same tokens), each token for token
    what one process generates."""
    assistant = harmony.encode_chat({"messages": [{"role": "user", "content": "x"}]})[-1]
    call = harmony.render_message(harmony.Message("assistant", CALL, "commentary", "functions.add",
                                                  "<|constrain|>json"))[0][2:]
    bigram_hf_model([assistant, *call], num_hidden_layers=2).save_pretrained(tmp_path / "ckpt")
    ports = free_ports(2)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "gptoss_jax.cli", "serve", "--checkpoint", str(tmp_path / "ckpt"), "--dtype", "float32",
         "--port", str(ports[0]), "--slots", "2", "--max-context", "256", "--mesh", "fsdp=4",
         "--coordinator", f"127.0.0.1:{ports[1]}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=open(tmp_path / f"out{i}.log", "w"), stderr=subprocess.STDOUT, text=True) for i in range(2)]
    strict = [{"type": "function", "function": {"name": "add", "strict": True, "parameters": {
        "type": "object", "properties": {"m": {"type": "string", "maxLength": 3}}, "required": ["m"],
        "additionalProperties": False}}}]
    bodies = [{"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 30},
              {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 30, "tools": strict}]
    try:
        url = f"http://127.0.0.1:{ports[0]}"
        wait_until_healthy(url, processes)
        replies = []
        for body in bodies:
            status, reply = _post(url, json.dumps(body).encode())
            assert status == 200, reply
            replies.append(reply["choices"][0])
        raw_prompt = parse_request(bodies[0], 256)[0]  # every token of the plain request, through /v1/completions
        status, raw = _post(url, json.dumps({"prompt": raw_prompt, "max_tokens": 30, "temperature": 0,
                                             "logprobs": 0}).encode(), path="/v1/completions")
        assert status == 200, raw
    finally:
        processes[0].terminate()
        for process in processes:
            process.wait(timeout=120)
    assert [p.returncode for p in processes] == [0, 0], (tmp_path / "out1.log").read_text()[-3000:]
    generator = Generator(gptoss_jax.load_model(tmp_path / "ckpt", dtype="float32"))
    expected = []
    for body in bodies:
        prompt, settings = parse_request(body, 256)
        expected.append(generator.generate([prompt], 30, constraints=constrain.RowConstraints(
            [settings["final_format"]], [settings["strict_tools"]]))[0])
    assert raw["choices"][0]["logprobs"]["tokens"] == [_token_text(t) for t in expected[0]]
    (plain,), (held,) = (reply["message"]["tool_calls"] for reply in replies)
    assert plain["function"]["arguments"] == CALL
    arguments = held["function"]["arguments"]
    assert arguments in tok.get_encoding().decode(expected[1]) and "<|call|>" in tok.get_encoding().decode(
        expected[1])
    jsonschema.validate(json.loads(arguments), strict[0]["function"]["parameters"])


# ---- hostile requests: a property over both APIs ----------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-3, 3, allow_nan=False)
                     | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)
# Values of the wrong type for most fields, and shapes the handlers index into.
_HOSTILE = st.sampled_from([True, "false", "no", "x", 1.5, 5, -1, [1], ["a"], {}, {"format": "json"},
                            {"include_usage": "yes"}, {"type": "objecty"}, [{"type": 5}]])
_TOKENS = st.sampled_from([1, 2, 3, 0, -1, 1.5, "2", True, None, [], {}])  # small when valid: short generations


def _fields(names):
    """Bodies with some of `names`, each a value of any JSON type, often a hostile one."""
    return st.dictionaries(st.sampled_from(sorted(names)), _HOSTILE | _JSON, max_size=6)


def _messages():
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", "developer", "robot", 5]),
                                     "content": st.text(max_size=8) | _HOSTILE | _JSON})
    return st.lists(message, min_size=1, max_size=2) | _HOSTILE


def _items():
    item = st.fixed_dictionaries({"type": st.sampled_from(["message", "reasoning", "function_call",
                                                           "function_call_output", "web_search_call", 5])},
                                 optional={"role": st.sampled_from(["user", "assistant"]),
                                           "content": _HOSTILE | _JSON | st.just([{"text": 5}]),
                                           "call_id": _HOSTILE | st.just("call_1"), "name": _HOSTILE | st.just("f"),
                                           "output": _JSON})
    return st.text(max_size=8) | st.lists(item, min_size=1, max_size=2) | _HOSTILE


def _exchange(url: str, body: dict) -> tuple[int, str]:
    """(status, body text) of one POST, reading a 200 stream to its end."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=AUTHORIZED)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_request_to_either_api_is_answered_whole_or_refused_with_a_4xx(server, data):
    """Random bodies over both APIs' fields (any JSON type in any field, hostile nested items): every answer is a
    2xx or a 4xx with an error object, never a 5xx, and a 200 stream always reaches its end."""
    from gptoss_jax import protocol as chat
    from gptoss_jax import responses

    if data.draw(st.booleans(), label="responses"):
        body = {"input": data.draw(_items(), label="input"), "max_output_tokens": data.draw(_TOKENS),
                "stream": data.draw(st.booleans() | _HOSTILE),
                **data.draw(_fields(set(responses._FIELDS) | set(responses._LABELS)), label="fields")}
        path = "/v1/responses"
    else:
        body = {"messages": data.draw(_messages(), label="messages"), "max_tokens": data.draw(_TOKENS),
                "stream": data.draw(st.booleans() | _HOSTILE),
                **data.draw(_fields(set(chat._FIELDS) | set(chat._LABELS)), label="fields")}
        path = "/v1/chat/completions"
    body = {key: value for key, value in body.items() if key not in ("n", "max_completion_tokens")
            or value in (1, 2)}  # no long generations from many choices or a larger budget
    status, text = _exchange(server + path, body)
    assert status < 500, (status, text[-500:], body)
    if status >= 400:
        assert "message" in json.loads(text)["error"], text
    elif body.get("stream") is True:  # the stream's last event closes it
        last = text.strip().rsplit("data: ", 1)[-1]
        assert last == "[DONE]" if path.endswith("completions") else json.loads(last)["type"] in (
            "response.completed", "response.incomplete", "response.failed"), (text[-500:], body)
