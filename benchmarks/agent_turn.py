"""What one tool turn of the agent loop costs, and how much of it is prefilling the conversation again.

A real checkpoint (the inference benchmark's sizes: 4 layers, hidden 512, 16 experts, vocabulary 201,088, float32)
whose greedy output is a call to the python tool (`tests/hf_models.bigram_hf_model`: its layers add nothing, so
the output is known, but every layer is computed as usual), after a user message of about N tokens. The loop runs
`TURNS` turns through `Generator`, the sandboxed `PythonTool` answering each call; then each part of a turn is
timed alone: the prefill of the whole conversation (what every turn paid before the loop kept its cache), the
extension of a kept engine slot by the ~40 tokens a turn appends (what a turn pays now), the decode of the
call, rendering the answer and parsing the output, and the python call. Last, the same conversation through
`gptoss-jax serve --tools python` (its own process, 1 slot, a 4,096-token context; the Responses API's
`max_tool_calls`): a server tool turn is the time of 3 answered calls less that of 1, halved (the choice keeps its
engine slot between turns, so it should not grow with the conversation).

    python benchmarks/agent_turn.py [N ...]
"""

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import openai  # noqa: E402
from timing import seconds  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax import agent, harmony  # noqa: E402
from gptoss_jax.engine import Engine, Request  # noqa: E402
from gptoss_jax.generation import Generator  # noqa: E402
from gptoss_jax.tools import PythonTool  # noqa: E402

from helpers import serving  # noqa: E402
from hf_models import bigram_hf_model  # noqa: E402

TURNS = 4
SIZES = {"num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 512, "head_dim": 64,
         "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 16, "num_experts_per_tok": 4}


def main(*lengths: int):
    lengths = lengths or (256, 1024, 2048)
    record = {"messages": [{"role": "user", "content": "x"}], "builtin_tools": ["python"]}
    call_message = harmony.Message("assistant", "print(6*7)", "analysis", "python", "code")
    rendered, prefix = harmony.render_message(call_message)
    call = rendered[prefix:]
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
          f"model: 4 layers, hidden 512, 16 experts, float32; {TURNS} turns per conversation")
    print("| prompt (tokens) | a turn of the loop (ms) | prefill of the whole conversation (ms) | resume: prefill "
          "of the appended tokens (ms) | decode of the call (ms) | render + parse (ms) | python call (ms) | "
          "server: a tool turn (ms) |")
    server_turns = {}
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        assistant = harmony.encode_chat(record)[-1]
        bigram_hf_model([assistant, *call], **SIZES).save_pretrained(directory)
        generator = Generator(gptoss_jax.load_model(directory, dtype="float32"))
        with PythonTool() as python:
            for length in lengths:
                words = " ".join(["word"] * (length - 8))
                question = {**record, "messages": [{"role": "user", "content": words}]}
                prompt = harmony.encode_chat(question)
                answer = harmony.Message("tool", python.run("print(6*7)"), "analysis", "assistant", name="python")
                appended = call + harmony.render_message(answer)[0] + agent.assistant_prompt()
                context = prompt + appended  # the second turn's prompt
                with agent.Toolset(python=python) as tools:
                    agent.run(generator, [question], [tools], max_turns=TURNS, temperature=0.0,
                              max_new_tokens=len(call) + 2)  # compiles
                    started = time.perf_counter()
                    agent.run(generator, [question], [tools], max_turns=TURNS, temperature=0.0,
                              max_new_tokens=len(call) + 2)
                    tools.pop("python")  # the kernel is closed by the outer `with`
                per_turn = (time.perf_counter() - started) / TURNS
                whole = seconds(lambda context=context: generator.generate([context], 1), 3)
                decode = seconds(lambda context=context: generator.generate([context], len(call)), 3) - whole
                resumed = []
                for _ in range(4):  # a fresh kept slot each time (going on consumes it); the first run compiles
                    # room for the prompt left-padded to its bucket (< twice its length) and the turn after it
                    engine = Engine(generator.model, slots=1, max_length=2 * len(context) + 8, steps=generator.steps,
                                    split=(generator.graphdef, generator.state))
                    kept = Request(prompt, len(call), keep=True)
                    engine.run([kept])
                    started = time.perf_counter()  # the slot holds the call but its end
                    engine.run([Request(appended[len(call) - 1:], 1, slot=kept.slot)])
                    resumed.append(time.perf_counter() - started)
                resume = min(resumed[1:])
                output = call

                def host(output=output, answer=answer):
                    harmony.parse(output, role="assistant")
                    harmony.render_message(answer)

                render_parse = seconds(host, 3)
                tool = seconds(lambda: python.run("print(6*7)"), 3)
                rows[length] = (f"| {len(prompt)} | {per_turn * 1e3:.0f} | {whole * 1e3:.0f} | {resume * 1e3:.0f} | "
                                f"{decode * 1e3:.0f} | {render_parse * 1e3:.2f} | {tool * 1e3:.0f} |")
        with serving(directory, "--tools", "python", "--slots", "1", "--max-context", "4096") as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for length in lengths:
                words = " ".join(["word"] * (length - 8))

                def calls(count, words=words):
                    client.responses.create(model="demo", input=words, tools=[{"type": "code_interpreter"}],
                                            temperature=0, max_tool_calls=count)

                server_turns[length] = (seconds(lambda: calls(3), 2) - seconds(lambda: calls(1), 2)) / 2
    for length in lengths:
        print(f"{rows[length]} {server_turns[length] * 1e3:.0f} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
