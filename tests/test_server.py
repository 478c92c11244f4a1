"""The OpenAI-compatible server, in its own process on 127.0.0.1, driven by the real `openai` client."""

import concurrent.futures
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.generation import Generator
from gptoss_jax.server import Completion

from helpers import free_ports, serving, wait_until_healthy

QUESTION = "Start with 3. Add 4, then multiply by 2. What is the result?"


@pytest.fixture(scope="module")
def server(demo_model_dir):
    with serving(demo_model_dir, "--slots", "4", "--max-context", "512") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


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
    """Each effort's tokens and log probabilities are the model's for the prompt rendered with that effort."""
    model, seen = generator.model, {}
    for effort in harmony.EFFORTS:
        response = _ask(client, QUESTION, effort, logprobs=True)
        generated = [item for item in response.choices[0].logprobs.content]
        prompt = harmony.encode_chat({"messages": [{"role": "user", "content": QUESTION}], "reasoning_effort": effort})
        tokens = generator.generate([prompt], 80)[0]
        assert [bytes(item.bytes) for item in generated] == [
            tok.get_encoding().decode_single_token_bytes(t) for t in tokens]
        logits = np.asarray(model(np.asarray([prompt + tokens[:-1]], np.int32)))[0, len(prompt) - 1:]
        expected = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(tokens)), tokens]
        np.testing.assert_allclose([item.logprob for item in generated], expected, atol=1e-4)
        seen[effort] = tuple(round(item.logprob, 4) for item in generated)
    assert len(set(seen.values())) == 3  # the effort changes the prompt, and so the probabilities


def test_sixteen_concurrent_requests_are_all_answered_correctly(client, generator):
    questions = [f"Start with {i % 9 + 1}. Add {i % 7 + 1}, then subtract 2. What is the result?" for i in range(16)]
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


def _post(server, body: bytes):
    request = urllib.request.Request(server + "/v1/chat/completions", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    status, body = _post(server, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, json.dumps({"messages": [{"role": "user", "content": "hi"}], "colour": 1}).encode())
    assert status == 400 and "unknown field 'colour'" in body["error"]["message"]
    status, body = _post(server, json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode())
    assert status == 400 and "messages[0].role" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="at most .* more fit in this server's 512-token context"):
        _ask(client, "word " * 300, max_tokens=400)
    with pytest.raises(openai.BadRequestError, match="this server's context holds 512"):
        _ask(client, "word " * 600)
    assert _ask(client, QUESTION).choices[0].message.content  # still serving
    with urllib.request.urlopen(server + "/v1/models") as response:
        assert json.loads(response.read())["data"][0]["object"] == "model"


def test_two_process_server_answers_like_one_process(tmp_path):
    """Process 0 serves HTTP and broadcasts each step; process 1 follows (127.0.0.1, gloo, one 4-device mesh)."""
    from hf_models import random_hf_model

    random_hf_model(seed=2, num_hidden_layers=2, vocab_size=201088).save_pretrained(tmp_path / "ckpt")
    ports = free_ports(2)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "gptoss_jax.cli", "serve", "--checkpoint", str(tmp_path / "ckpt"), "--dtype", "float32",
         "--port", str(ports[0]), "--slots", "2", "--max-context", "256", "--mesh", "fsdp=4",
         "--coordinator", f"127.0.0.1:{ports[1]}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=open(tmp_path / f"out{i}.log", "w"), stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        url = f"http://127.0.0.1:{ports[0]}"
        wait_until_healthy(url, processes)
        body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 12, "logprobs": True}
        status, reply = _post(url, json.dumps(body).encode())
        assert status == 200, reply
        tokens = [bytes(item["bytes"]) for item in reply["choices"][0]["logprobs"]["content"]]
    finally:
        processes[0].terminate()
        for process in processes:
            process.wait(timeout=120)
    assert [p.returncode for p in processes] == [0, 0], (tmp_path / "out1.log").read_text()[-3000:]
    generator = Generator(gptoss_jax.load_model(tmp_path / "ckpt", dtype="float32"))
    expected = generator.generate([harmony.encode_chat({"messages": body["messages"]})], 12)[0]
    assert tokens == [tok.get_encoding().decode_single_token_bytes(t) for t in expected]
