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


class ScriptedModel:
    """Stands in for `Generator`: conversation i's k-th generation is script[i][k] (with the prompt it was given
    recorded), whatever the prompt; tokens are streamed as a generator streams them."""

    def __init__(self, scripts, max_positions=4096):
        self.scripts = [list(script) for script in scripts]
        self.prompts = [[] for _ in scripts]
        self.batches = []
        self.model = type("M", (), {"config": type("C", (), {"max_position_embeddings": max_positions})})

    def resume(self, cache, appended, max_new_tokens, **settings):
        """A cache here is each row's tokens fed so far: resuming reads them and the appended tokens."""
        return self.generate([row + list(chunk) for row, chunk in zip(cache, appended, strict=True)],
                             max_new_tokens, keep_cache=True, **settings)

    @staticmethod
    def take_rows(cache, rows):
        return [cache[row] for row in rows]

    @staticmethod
    def fed(cache):
        return [len(row) for row in cache]

    def generate(self, prompts, max_new_tokens, *, stream=None, seed, keep_cache=False, **_settings):
        self.batches.append([])
        outputs = []
        for row, prompt in enumerate(prompts):
            conversation = self._conversation(prompt)
            self.batches[-1].append(conversation)
            self.prompts[conversation].append(list(prompt))
            room = max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens[row]
            output = self.scripts[conversation].pop(0)[:room]
            for token in output:
                stream(row, token)
            outputs.append(output)
        if keep_cache:  # as a real cache: the last token of each output sampled but not fed
            return outputs, [list(prompt) + output[:-1] for prompt, output in zip(prompts, outputs, strict=True)]
        return outputs

    def _conversation(self, prompt):
        """Which conversation a prompt belongs to: the one whose first prompt it extends, else the next new one."""
        for conversation, earlier in enumerate(self.prompts):
            if earlier and prompt[: len(earlier[0])] == earlier[0]:
                return conversation
        return next(conversation for conversation, earlier in enumerate(self.prompts) if not earlier)


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


def test_python_state_is_kept_across_calls_and_errors_go_back_to_the_model(toolset):
    script = [python("x = 21\nprint('set')"), python("x * 2"), python("1 / 0"), said("It is 42.")]
    model = ScriptedModel([script])
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
    prompts = model.prompts[0]
    for before, output, answer, after in zip(prompts, script, answers, prompts[1:], strict=False):
        assert after == before + output + harmony.render_message(answer)[0] + agent.assistant_prompt()
    assert done.tokens == prompts[-1] + script[-1]
    # the model's prompt renders the python tool, and the loop's messages render back to the same tokens
    rendered = harmony.encode_chat({**record("What is 21 * 2?"), "messages": [
        {"role": "user", "content": "What is 21 * 2?"}, *done.as_records()[:-1]]})
    assert rendered == prompts[-1]


def test_browser_search_open_find_over_a_local_folder(toolset):
    script = [browser("search", '{"query": "Dune novel author"}'), browser("open", '{"id": 0, "cursor": 0}'),
              browser("find", '{"pattern": "arrakis"}'), said("Frank Herbert 【1†L2】.")]
    (done,) = agent.run(ScriptedModel([script]), [record("Who wrote Dune?", builtin=("browser",))], [toolset])
    search, opened, found = (step.messages[0] for step in done.steps if step.kind == "tool")
    assert search.name == "browser.search" and search.text.startswith("[0] Dune novel author")
    assert "【0†Dune" in search.text
    assert opened.text.startswith("[1] Dune") and "Frank Herbert" in opened.text and "L2:" in opened.text
    assert found.text.startswith("[2] Find results for text: `arrakis`") and "Arrakis" in found.text
    assert done.finish == "final"


def test_a_function_call_goes_back_to_the_caller_and_the_loop_resumes_with_the_tools_state(toolset):
    weather = said('{"city": "Oslo"}', "commentary", "functions.get_weather", "<|constrain|>json")
    model = ScriptedModel([[python("t = 16"), weather, python("t ** 0.5"), said("4.0")]])
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


def test_turn_and_token_budgets_end_the_loop(toolset):
    forever = [python(f"print({i})") for i in range(10)]
    (turns,) = agent.run(ScriptedModel([forever]), [record("Loop.")], [toolset], max_turns=3)
    assert turns.finish == "max_turns" and [s.kind for s in turns.steps] == ["model", "tool"] * 2 + ["model"]
    prompt = len(harmony.encode_chat(record("Loop.")))
    (tokens,) = agent.run(ScriptedModel([forever]), [record("Loop.")], [toolset], max_tokens=prompt + 40)
    assert tokens.finish == "max_tokens" and len(tokens.tokens) >= prompt + 40 and len(tokens.steps) < 6
    long = said("word " * 100)
    (cut,) = agent.run(ScriptedModel([[long]]), [record("Talk.")], [toolset], max_new_tokens=30)
    assert cut.finish == "length" and cut.steps[0].tokens == 30


def test_a_call_to_a_tool_the_conversation_lacks_is_answered_with_an_error(toolset):
    script = [browser("search", '{"query": "x"}'), said("Sorry.")]
    (done,) = agent.run(ScriptedModel([script]), [record("Search.")], [agent.Toolset(python=toolset["python"])])
    answer = done.steps[1].messages[0]
    assert answer.text.startswith("Error: there is no tool 'browser.search' in this conversation (tools: python)")
    assert done.finish == "final"


def test_conversations_run_as_one_batch_until_each_ends(toolset, tmp_path):
    scripts = [[python("print('a')"), said("A.")], [said("B.")], [python("print('c')"), python("1"), said("C.")]]
    model = ScriptedModel(scripts)
    with agent.builtin_tools(["python"])() as second, agent.builtin_tools(["python"])() as third:
        done = agent.run(model, [record("a?"), record("b?"), record("c?")], [toolset, second, third])
    assert [c.final for c in done] == ["A.", "B.", "C."]
    assert [len(batch) for batch in model.batches] == [3, 2, 1]


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
