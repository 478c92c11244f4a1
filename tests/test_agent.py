"""The agent loop (`gptoss_jax.agent`): a scripted model (a stand-in generator that emits fixed harmony messages)
drives the loop's logic against the real python and browser tools; a real tiny checkpoint drives the end-to-end
path through `Generator`."""

import shutil

import pytest

import gptoss_jax
from gptoss_jax import agent, harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.generation import Generator

from hf_models import bigram_hf_model

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap (bwrap) is not installed: the python tool's sandbox needs it")


def said(text, channel="final", recipient=None, content_type=None):
    """The tokens the model generates for one message after the prompt's `<|start|>assistant`."""
    message = harmony.Message("assistant", text, channel, recipient, content_type)
    tokens, prefix = harmony.render_message(message, end=tok.RETURN if channel == "final" else None)
    return tokens[prefix:]


def python(code):
    return said(code, "analysis", "python", "code")


def browser(function, arguments):
    return said(arguments, "analysis", f"browser.{function}", "json")


class ScriptedEngine:
    """Stands in for the engine under `agent.run`: conversation i's k-th generation is script[i][k] (with the whole
    sequence it was asked to go on from recorded), whatever that sequence; tokens are streamed as the engine streams
    them. A kept slot holds its sequence as a real cache would: the last token of each output sampled, not fed."""

    def __init__(self, scripts):
        self.scripts = [list(script) for script in scripts]
        self.prompts = [[] for _ in scripts]
        self.kept = {}  # slot -> the sequence its cache holds
        self.slots = 0  # slots handed out
        self.max_length = None  # set by `run`, as it makes its engine

    def __call__(self, model, *, max_length, **_settings):
        self.max_length = max_length
        return self

    def start(self):
        return self

    def stop(self):
        pass

    def room(self, slot):
        return self.max_length - len(self.kept[slot]) + 1

    def cancel(self, request):
        self.kept.pop(request.slot, None)

    def submit(self, request):
        sequence = (self.kept.pop(request.slot) if request.slot is not None else []) + list(request.prompt)
        conversation = self._conversation(sequence)
        self.prompts[conversation].append(sequence)
        if request.slot is None:
            request.slot, self.slots = self.slots, self.slots + 1
        output = self.scripts[conversation].pop(0)[:request.max_tokens]
        for token in output:
            request.tokens.append(token)
            request.on_token(token, float("nan"), ())
        if request.keep:
            self.kept[request.slot] = sequence + output[:-1]
        request.on_done("stop" if output and output[-1] in request.stop_tokens else "length")

    def _conversation(self, prompt):
        """Which conversation a prompt belongs to: the one whose first prompt it extends, else the next new one."""
        for conversation, earlier in enumerate(self.prompts):
            if earlier and prompt[: len(earlier[0])] == earlier[0]:
                return conversation
        return next(conversation for conversation, earlier in enumerate(self.prompts) if not earlier)


@pytest.fixture
def scripted(monkeypatch):
    """scripted(scripts) -> (a stand-in generator for `agent.run`, the scripted engine it runs on)."""

    def make(scripts, max_positions=4096):
        engine = ScriptedEngine(scripts)
        monkeypatch.setattr(agent, "Engine", engine)
        config = type("C", (), {"max_position_embeddings": max_positions})
        return type("G", (), {"model": type("M", (), {"config": config}), "graphdef": None, "state": None,
                              "steps": None}), engine

    return make


def record(question, builtin=("python",), **extra):
    return {"messages": [{"role": "user", "content": question}], "builtin_tools": list(builtin), **extra}


@pytest.fixture
def toolset(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "dune.md").write_text("# Dune\n\nDune is a 1965 novel by Frank Herbert.\n\nIt is set on Arrakis.\n")
    (docs / "tea.txt").write_text("Green tea is brewed at 80 degrees.\n")
    with agent.builtin_tools(["python", "browser"], browser_docs=str(docs))() as tools:
        yield tools


def test_python_state_is_kept_across_calls_and_errors_go_back_to_the_model(toolset, scripted):
    script = [python("x = 21\nprint('set')"), python("x * 2"), python("1 / 0"), said("It is 42.")]
    model, engine = scripted([script])
    (done,) = agent.run(model, [record("What is 21 * 2?")], [toolset])
    assert done.finish == "final" and done.final == "It is 42."
    assert [step.kind for step in done.steps] == ["model", "tool"] * 3 + ["model"]
    answers = [step.messages[0] for step in done.steps if step.kind == "tool"]
    assert [a.text.strip() for a in answers[:2]] == ["set", "42"]
    assert "ZeroDivisionError" in answers[2].text
    assert all((a.role, a.name, a.channel, a.recipient) == ("tool", "python", "analysis", "assistant")
               for a in answers)
    assert [m.text for m in done.tool_calls] == ["x = 21\nprint('set')", "x * 2", "1 / 0"]
    # each generation reads the previous context, the model's tokens as sampled, then the tool's answer
    prompts = engine.prompts[0]
    for before, output, answer, after in zip(prompts, script, answers, prompts[1:], strict=False):
        assert after == before + output + harmony.render_message(answer)[0] + agent.assistant_prompt()
    assert done.tokens == prompts[-1] + script[-1]
    # the model's prompt renders the python tool, and the loop's messages render back to the same tokens
    rendered = harmony.encode_chat({**record("What is 21 * 2?"), "messages": [
        {"role": "user", "content": "What is 21 * 2?"}, *done.as_records()[:-1]]})
    assert rendered == prompts[-1]


def test_browser_search_open_find_over_a_local_folder(toolset, scripted):
    script = [browser("search", '{"query": "Dune novel author"}'), browser("open", '{"id": 0, "cursor": 0}'),
              browser("find", '{"pattern": "arrakis"}'), said("Frank Herbert 【1†L2】.")]
    (done,) = agent.run(scripted([script])[0], [record("Who wrote Dune?", builtin=("browser",))], [toolset])
    search, opened, found = (step.messages[0] for step in done.steps if step.kind == "tool")
    assert search.name == "browser.search" and search.text.startswith("[0] Dune novel author")
    assert "【0†Dune" in search.text
    assert opened.text.startswith("[1] Dune") and "Frank Herbert" in opened.text and "L2:" in opened.text
    assert found.text.startswith("[2] Find results for text: `arrakis`") and "Arrakis" in found.text
    assert done.finish == "final"


def test_a_function_call_goes_back_to_the_caller_and_the_loop_resumes_with_the_tools_state(toolset, scripted):
    weather = said('{"city": "Oslo"}', "commentary", "functions.get_weather", "<|constrain|>json")
    model, _ = scripted([[python("t = 16"), weather, python("t ** 0.5"), said("4.0")]])
    question = record("Square root of Oslo's temperature?",
                      tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
                          "type": "object", "properties": {"city": {"type": "string"}}}}}])
    (first,) = agent.run(model, [question], [toolset])
    assert first.finish == "function_call"
    (call,) = first.function_calls
    assert (call.recipient, call.text) == ("functions.get_weather", '{"city": "Oslo"}')
    resumed = {**question, "messages": [*question["messages"], *first.as_records(),
                                        {"role": "tool", "name": "get_weather", "content": "16"}]}
    (second,) = agent.run(model, [resumed], [toolset])
    assert second.finish == "final" and second.final == "4.0"
    assert second.steps[1].messages[0].text.strip() == "4.0"  # `t`, set before the function call, is still there


def test_turn_and_token_budgets_end_the_loop(toolset, scripted):
    forever = [python(f"print({i})") for i in range(10)]
    (turns,) = agent.run(scripted([forever])[0], [record("Loop.")], [toolset], max_turns=3)
    assert turns.finish == "max_turns" and [s.kind for s in turns.steps] == ["model", "tool"] * 2 + ["model"]
    prompt = len(harmony.encode_chat(record("Loop.")))
    (tokens,) = agent.run(scripted([forever])[0], [record("Loop.")], [toolset], max_tokens=prompt + 40)
    assert tokens.finish == "max_tokens" and len(tokens.tokens) >= prompt + 40 and len(tokens.steps) < 6
    long = said("word " * 100)
    (cut,) = agent.run(scripted([[long]])[0], [record("Talk.")], [toolset], max_new_tokens=30)
    assert cut.finish == "length" and cut.steps[0].tokens == 30


def test_a_call_to_a_tool_the_conversation_lacks_is_answered_with_an_error(toolset, scripted):
    script = [browser("search", '{"query": "x"}'), said("Sorry.")]
    (done,) = agent.run(scripted([script])[0], [record("Search.")], [agent.Toolset(python=toolset["python"])])
    answer = done.steps[1].messages[0]
    assert answer.text.startswith("Error: there is no tool 'browser.search' in this conversation (tools: python)")
    assert done.finish == "final"


def test_conversations_run_at_once_each_in_the_slot_it_keeps_until_it_ends(toolset, scripted):
    scripts = [[python("print('a')"), said("A.")], [said("B.")], [python("print('c')"), python("1"), said("C.")]]
    model, engine = scripted(scripts)
    with agent.builtin_tools(["python"])() as second, agent.builtin_tools(["python"])() as third:
        done = agent.run(model, [record("a?"), record("b?"), record("c?")], [toolset, second, third])
    assert [c.final for c in done] == ["A.", "B.", "C."]
    assert [len(prompts) for prompts in engine.prompts] == [2, 1, 3]
    # one slot a conversation, its later turns appended to it; every slot released at the end
    assert engine.slots == 3 and engine.kept == {}


def test_bad_tool_settings_fail_before_anything_runs():
    with pytest.raises(ValueError, match="unknown built-in tool 'calculator'"):
        agent.builtin_tools(["python", "calculator"])
    with pytest.raises(ValueError, match="the browser tool needs a folder of documents"):
        agent.builtin_tools(["browser"])


def test_a_real_model_calls_python_and_reads_its_answer(tmp_path):
    """A real checkpoint whose greedy output is a python call (`bigram_hf_model`): through `Generator`, the loop
    runs the call in the sandbox, appends the answer, and the model (which calls again) is stopped by max_turns."""
    prompt = harmony.encode_chat(record("Compute."))
    call = python("print(6*7)")
    bigram_hf_model([prompt[-1], *call], num_hidden_layers=2).save_pretrained(tmp_path / "ckpt")
    generator = Generator(gptoss_jax.load_model(tmp_path / "ckpt", dtype="float32"))
    with agent.builtin_tools(["python"])() as tools:
        (done,) = agent.run(generator, [record("Compute.")], [tools], max_turns=2, temperature=0.0,
                            max_new_tokens=len(call) + 4)
    assert done.finish == "max_turns"
    assert [m.text for m in done.tool_calls] == ["print(6*7)"] * 2  # the second, in the last turn, unanswered
    assert [s.messages[0].text for s in done.steps if s.kind == "tool"] == ["42"]


def test_chat_with_tools_shows_the_calls_and_answers_as_they_happen(tmp_path):
    """`gptoss-jax chat --tools python` with the python-calling checkpoint: the call and the sandbox's answer
    are printed, and the turn ends at the loop's turn limit with a note."""
    import subprocess
    import sys

    prompt = harmony.encode_chat(record("Compute."))
    call = python("print(6*7)")
    bigram_hf_model([prompt[-1], *call], num_hidden_layers=2).save_pretrained(tmp_path / "ckpt")
    command = [sys.executable, "-m", "gptoss_jax.cli", "chat", "--checkpoint", str(tmp_path / "ckpt"),
               "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "40", "--max-turns", "3",
               "--tools", "python"]
    result = subprocess.run(command, input="Compute.\n/exit\n", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[call python]\nprint(6*7)") == 3
    assert result.stdout.count("[python answered]\n42") == 2
    assert "[the turn ended without an answer: max_turns]" in result.stderr
    bad = subprocess.run([*command[:-1], "python,calculator"], input="", capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown built-in tool 'calculator'" in bad.stderr
