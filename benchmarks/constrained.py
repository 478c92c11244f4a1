"""What structured outputs cost a decode step: every row constrained vs none, at batch 1 and 16, and a mixed batch.

Model: the inference benchmark's (4 layers, hidden 512, 16 experts, the real 201,088-token vocabulary, float32,
random weights), decoding 48 tokens greedily after prompts (a different question per row) that have opened the
final channel, so that every step of a constrained row is masked. The constraint: a JSON schema (an array of at
least 100 objects with a bounded string and a number) that a random model cannot finish in 48 tokens, so no row
stops early; strings are the costly case for the engine (most of the vocabulary is allowed inside one). The
mixed batch constrains every other row; its free rows must come out token for token as in the unconstrained run.
Host-side mask time per row and token is measured on its own too (llguidance filling one bitmask row).

    python benchmarks/constrained.py
"""

import functools
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from timing import median, seconds  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax import constrain, harmony  # noqa: E402
from gptoss_jax import tokenizer as tok  # noqa: E402
from gptoss_jax.generation import Generator  # noqa: E402

CONFIG = gptoss_jax.GptOssConfig.tiny().replace(hidden_size=512, intermediate_size=512, head_dim=64,
                                                num_attention_heads=8, num_experts=16, sliding_window=128)
STEPS, BATCHES = 48, (1, 16)
TEMPERATURE = 0.0  # greedy: the step is the model and the mask alone (sampling at 1.0 sorts the vocabulary per row)
SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "score": {"type": "number"}},
    "required": ["name", "score"], "additionalProperties": False}}


def generate(generator, prompts, schema, batch, rows):
    """STEPS greedy tokens for the first `batch` prompts, the rows in `rows` held to the schema."""
    constraints = constrain.RowConstraints([schema if row in rows else None for row in range(batch)])
    return generator.generate(prompts[:batch], STEPS, temperature=TEMPERATURE, seed=list(range(batch)),
                              constraints=constraints if rows else None)


def main():
    generator = Generator(gptoss_jax.GptOss(CONFIG, dtype="float32", rngs=nnx.Rngs(0)))
    opened = [tok.CHANNEL, *tok.get_encoding().encode_ordinary("final"), tok.MESSAGE]
    # A different question per row: identical rows would all route to the same experts, which flatters a batch
    prompts = [harmony.encode_chat({"messages": [{"role": "user", "content": f"List the scores of team {row}."}]})
               + opened for row in range(max(BATCHES))]
    schema = constrain.Constraint("json_schema", SCHEMA)
    print(f"{platform.processor() or platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), jax {jax.__version__}; {STEPS} decode steps, temperature {TEMPERATURE}")
    print("| batch | none (ms/step) | all constrained (ms/step) | ratio | mixed (ms/step) | mixed ratio | "
          "free rows equal |")
    print("|---|---|---|---|---|---|---|")
    for batch in BATCHES:
        outputs, times = {}, {}
        for name, rows in (("none", set()), ("all", set(range(batch))), ("mixed", set(range(1, batch, 2)))):
            if batch == 1 and name == "mixed":
                continue
            outputs[name] = generate(generator, prompts, schema, batch, rows)
            assert all(len(tokens) == STEPS for tokens in outputs[name]), "a row stopped early"
            run = functools.partial(generate, generator, prompts, schema, batch, rows)
            times[name] = seconds(run, 7, summary=median) / STEPS * 1e3
        none, every = times["none"], times["all"]
        if batch > 1:
            mixed = f"{times['mixed']:.2f} | {times['mixed'] / none:.3f}x"
            free_equal = all(outputs["mixed"][row] == outputs["none"][row] for row in range(0, batch, 2))
        else:
            mixed, free_equal = "- | -", "-"
        print(f"| {batch} | {none:.2f} | {every:.2f} | {every / none:.3f}x | {mixed} | {free_equal} |")

    state = constrain.start(prompts[0], schema)
    bitmask = constrain.allocate(1, CONFIG.vocab_size)
    fills = []
    for token in tok.get_encoding().encode_ordinary('[' + '{"name":"a fairly long name","score":1.5},' * 4):
        start = time.perf_counter()
        state.fill(bitmask, 0)
        fills.append(time.perf_counter() - start)
        state.advance(token)
    print(f"\nhost mask per row and token (llguidance): median {median(fills) * 1e3:.3f} ms, "
          f"max {max(fills) * 1e3:.3f} ms over {len(fills)} tokens")


if __name__ == "__main__":
    main()
