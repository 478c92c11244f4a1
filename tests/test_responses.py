"""The Responses API (`POST /v1/responses`) and server-side built-in tools, through the real `openai` client: the
demo model's answers equal `Generator.generate`'s, streamed as the Responses events; stored responses continue
with previous_response_id; a function call's round trip; python calls the server answers (`serve --tools`)."""

import json
import shutil
import urllib.error
import urllib.request

import openai
import pytest

import gptoss_jax
from gptoss_jax import harmony
from gptoss_jax.generation import Generator

from helpers import serving
from hf_models import bigram_hf_model

QUESTION = "Count the rs, starting again from zero at every x: r, s, x, r, r, a, t, r, o, x, r, e."
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (bwrap) is not installed: the python tool's sandbox needs it")


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    with serving(demo_model_dir, "--slots", "4", "--max-context", "512") as url:
        yield (openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0),
               Generator(gptoss_jax.load_model(demo_model_dir, dtype="float32")), url)


def _expected(generator, messages, effort, max_tokens):
    """(analysis, final, prompt length) of greedy `generate` on the conversation."""
    prompt = harmony.encode_chat({"messages": messages, "reasoning_effort": effort})
    parsed = harmony.parse(generator.generate([prompt], max_tokens)[0], role="assistant")
    messages = parsed.messages + ([parsed.partial] if parsed.partial else [])
    return ("".join(m.text for m in messages if m.channel == "analysis"),
            "".join(m.text for m in messages if m.channel == "final"), len(prompt))


def test_a_response_equals_generate_and_streams_as_responses_events(demo):
    client, generator, _ = demo
    response = client.responses.create(model="demo", input=QUESTION, reasoning={"effort": "low"}, temperature=0,
                                       max_output_tokens=100)
    analysis, final, prompt = _expected(generator, [{"role": "user", "content": QUESTION}], "low", 100)
    assert analysis and final  # the demo model writes both channels
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == analysis and response.output_text == final
    assert response.status == "completed" and response.usage.input_tokens == prompt
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    events = list(client.responses.create(model="demo", input=QUESTION, reasoning={"effort": "low"}, temperature=0,
                                          max_output_tokens=100, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == analysis
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert done == ["reasoning", "message"] and events[-1].response.output_text == final
    # what OpenAI's gpt-oss eval client (ResponsesSampler) sends: role/content messages, a developer one first
    listed = client.responses.create(model="demo", input=[{"role": "developer", "content": "Be brief."},
                                                          {"role": "user", "content": QUESTION}],
                                     reasoning={"effort": "low"}, temperature=0, max_output_tokens=100)
    conversation = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    assert (listed.output_text, listed.usage.input_tokens) == _expected(generator, conversation, "low", 100)[1:]


def test_previous_response_id_continues_the_stored_conversation(demo):
    """The second turn's prompt is the first turn (its analysis dropped, as harmony does for a finished turn) plus
    the new input, under the new instructions; the response is retrievable by id."""
    client, generator, url = demo
    first = client.responses.create(model="demo", input=QUESTION, temperature=0, max_output_tokens=100)
    second = client.responses.create(model="demo", input="And with one more r?", previous_response_id=first.id,
                                     instructions="Answer briefly.", temperature=0, max_output_tokens=100)
    conversation = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": QUESTION},
                    {"role": "assistant", "thinking": first.output[0].content[0].text,
                     "content": first.output_text}, {"role": "user", "content": "And with one more r?"}]
    analysis, final, prompt = _expected(generator, conversation, "medium", 100)
    assert second.usage.input_tokens == prompt and second.output_text == final
    assert client.responses.retrieve(second.id).output_text == final
    with pytest.raises(openai.BadRequestError, match="previous_response_id: no stored response 'resp_nope'"):
        client.responses.create(model="demo", input="x", previous_response_id="resp_nope")
    unstored = client.responses.create(model="demo", input="x", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("field, value, message", [
    ("background", True, "background: true is not supported"),
    ("reasoning", {"effort": "extreme"}, "reasoning.effort: expected one of"),
    ("colour", 1, "unknown field 'colour'"),
    ("tools", [{"type": "code_interpreter"}], r"tools\[0\]: the built-in python tool is not enabled on this server"),
    ("tools", [{"type": "file_search"}], r"tools\[0\].type: expected \"function\" or a built-in tool"),
    ("input", [{"type": "function_call_output", "call_id": "c1", "output": "1"}], "input.0..call_id: 'c1' names no"),
    # each of these was a 500 (a handler indexing into the wrong type)
    ("input", [{"type": "reasoning", "content": 5}], r"input\[0\].content: expected an array, got 5"),
    ("input", [{"type": "reasoning", "content": [{"text": 5}]}], r"input\[0\].content\[0\].text: expected a string"),
    ("text", {"format": "json"}, "text.format: expected an object, got \"json\""),
    ("text", [1], r"text: expected an object, got \[1\]"),
    ("input", [{"type": "function_call_output", "call_id": [1]}], r"input\[0\].call_id: expected a string"),
    ("input", [{"type": "function_call_output", "call_id": {}}], r"input\[0\].call_id: expected a string"),
    ("previous_response_id", ["a"], r"previous_response_id: expected a string, got \[\"a\"\]"),
    ("previous_response_id", {}, "previous_response_id: expected a string, got {}"),
    # and these were coerced where OpenAI answers 400
    ("stream", "false", "stream: expected a boolean, got \"false\""),
    ("max_output_tokens", 1.5, "max_output_tokens: expected an integer, got 1.5"),
    ("model", 5, "model: expected a string, got 5"),
])
def test_bad_requests_are_a_400_naming_the_field(demo, field, value, message):
    _, _, url = demo
    body = {"model": "demo", "input": "hi", field: value}
    request = urllib.request.Request(url + "/v1/responses", data=json.dumps(body).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 400
    assert __import__("re").search(message, json.loads(raised.value.read())["error"]["message"])


CALL = '{"n":7}'
ADD = {"type": "function", "name": "add", "description": "Adds.",
       "parameters": {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}}


@pytest.fixture(scope="module")
def function_caller(tmp_path_factory):
    """A server on a model that answers every prompt with a call to functions.add (greedy)."""
    directory = tmp_path_factory.mktemp("adder")
    assistant = harmony.encode_chat({"messages": [{"role": "user", "content": "x"}]})[-1]
    call = harmony.render_message(harmony.Message("assistant", CALL, "commentary", "functions.add",
                                                  "<|constrain|>json"))
    bigram_hf_model([assistant, *call[0][call[1]:]], num_hidden_layers=2).save_pretrained(directory)
    with serving(directory, "--slots", "2", "--max-context", "512") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_a_function_call_round_trip(function_caller):
    """The call comes back as a function_call item (whole and streamed); its output, sent with the call's id and
    previous_response_id, is rendered into the next prompt as the function's result."""
    first = function_caller.responses.create(model="demo", input="Add seven.", tools=[ADD], temperature=0,
                                             max_output_tokens=40)
    (call,) = first.output
    assert (call.type, call.name, call.arguments, call.status) == ("function_call", "add", CALL, "completed")
    second = function_caller.responses.create(
        model="demo", previous_response_id=first.id, tools=[ADD], temperature=0, max_output_tokens=40,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "9"}])
    record = {"tools": [{"type": "function", "function": {k: v for k, v in ADD.items() if k != "type"}}],
              "messages": [{"role": "user", "content": "Add seven."},
                           {"role": "assistant", "channel": "commentary", "recipient": "functions.add",
                            "content_type": "<|constrain|>json", "content": CALL},
                           {"role": "tool", "name": "add", "content": "9"}]}
    assert second.usage.input_tokens == len(harmony.encode_chat(record))
    events = list(function_caller.responses.create(model="demo", input="Add seven.", tools=[ADD], temperature=0,
                                                   max_output_tokens=40, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == CALL
    assert [e.item.name for e in events if e.type == "response.output_item.done"] == ["add"]


@pytest.fixture(scope="module")
def python_caller(tmp_path_factory):
    """A server running the python tool (`--tools python`) on a model that calls python at every turn."""
    directory = tmp_path_factory.mktemp("pycaller")
    assistant = harmony.encode_chat({"messages": [{"role": "user", "content": "x"}]})[-1]
    call = harmony.render_message(harmony.Message("assistant", "print(6*7)", "analysis", "python", "code"))
    bigram_hf_model([assistant, *call[0][call[1]:]], num_hidden_layers=2).save_pretrained(directory)
    with serving(directory, "--slots", "2", "--max-context", "512", "--tools", "python", "--max-turns", "3") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@needs_bwrap
def test_the_server_runs_python_calls_when_the_request_enables_the_tool(python_caller):
    """Responses: each answered call is a code_interpreter_call item with the sandbox's output; the model calls
    again every turn, so max_tool_calls (or the server's --max-turns) ends the response, incomplete. Chat
    completions: the same calls run, their tokens counted; function tools alone run nothing."""
    response = python_caller.responses.create(model="demo", input="Compute.", tools=[{"type": "code_interpreter"}],
                                              temperature=0, max_tool_calls=1)
    (item,) = response.output
    assert (item.type, item.code, item.outputs[0].logs) == ("code_interpreter_call", "print(6*7)", "42")
    assert response.status == "incomplete"
    streamed = list(python_caller.responses.create(model="demo", input="Compute.", tools=[{"type": "python"}],
                                                   temperature=0, stream=True))
    assert [e.item.outputs[0].logs for e in streamed if e.type == "response.output_item.done"] == ["42"] * 2
    assert streamed[-1].type == "response.incomplete"
    call_tokens = len(harmony.render_message(harmony.Message("assistant", "print(6*7)", "analysis", "python",
                                                             "code"))[0]) - 2
    chat = python_caller.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Compute."}],
                                                 tools=[{"type": "code_interpreter"}], temperature=0)
    assert chat.usage.completion_tokens == 3 * call_tokens and chat.choices[0].finish_reason == "length"
    plain = python_caller.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Compute."}],
                                                  temperature=0, max_tokens=40)
    assert plain.usage.completion_tokens == call_tokens and plain.choices[0].finish_reason == "stop"
