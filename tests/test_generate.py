"""Generation: greedy equals transformers' generate(), cached decode equals full recomputation, sampling."""

import math
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptoss_jax
from gptoss_jax import GptOssConfig, agent, harmony, sharding, synthetic
from gptoss_jax.engine import Engine, Request, _sample_rows, first_max_index
from gptoss_jax.generation import Generator, generate
from gptoss_jax.harmony import HEADER_CUT
from gptoss_jax.model import LayerArrays, split_for_inference

from helpers import arrays_written, free_ports, relative_error, whole_cache_copies
from hf_models import hf_and_ours, random_hf_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random transformers model (window 5) and ours loaded from its checkpoint, float32."""
    return hf_and_ours(tmp_path_factory.mktemp("gen"), seed=21, num_hidden_layers=3, sliding_window=5)


def test_greedy_generation_equals_transformers(pair):
    hf, ours = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n).tolist() for n in (12, 3, 7)]  # 12 > the window of 5
    new = 32
    longest = max(map(len, prompts))
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[:, longest:].tolist()
    assert generate(ours, prompts, new, stop_tokens=[]) == expected


def test_cached_decode_logits_equal_full_recomputation(pair):
    """Every decode step's logits equal a cache-free forward pass over the whole left-padded sequences."""
    _, model = pair
    rng = np.random.default_rng(1)
    lengths, new = [9, 4, 1], 8
    longest = max(lengths)
    sequences = np.zeros((len(lengths), longest + new), np.int32)
    start = np.array([longest - n for n in lengths], np.int32)
    for row in range(len(lengths)):
        sequences[row, start[row]:] = rng.integers(0, 300, lengths[row] + new)
    index = np.arange(longest + new)
    full = np.asarray(model(sequences, positions=np.maximum(index - start[:, None], 0),
                            segment_ids=(index >= start[:, None]).astype(np.int32)))
    cache = model.init_cache(jnp.asarray(start), longest + new)
    logits, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, sequences[:, :longest], cache)
    decode = nnx.jit(lambda m, t, c: m.decode(t, c))
    for step in range(new):
        assert relative_error(logits, full[:, longest - 1 + step]) <= 1e-5, step
        logits, cache = decode(model, sequences[:, longest + step], cache)


def test_stop_tokens_end_each_row_and_stream_reports_every_token(pair):
    _, model = pair
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(model, prompts, 12, stop_tokens=[])
    stop = free[0][4]
    streamed = []
    out = generate(model, prompts, 12, stop_tokens=[stop], stream=lambda row, token: streamed.append((row, token)))
    assert out[0] == free[0][: free[0].index(stop) + 1]
    assert out[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])
    assert [t for r, t in streamed if r == 0] == out[0] and [t for r, t in streamed if r == 1] == out[1]


def _draws(logits, *, temperature, top_p, top_k, seed=0, steps=None):
    """The engine's sampler on rows [B, V] that share settings, row i with key (seed, step i)."""
    rows = logits.shape[0]
    return np.asarray(_sample_rows(logits, steps=jnp.arange(rows) if steps is None else steps,
                                   temperature=jnp.full(rows, temperature), top_p=jnp.full(rows, top_p),
                                   top_k=jnp.full(rows, top_k, jnp.int32), seed=jnp.full(rows, seed, jnp.int32)))


def test_sampling_settings():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    assert np.all(_draws(logits, temperature=0.0, top_p=1.0, top_k=0) == 0)
    drawn = _draws(logits, temperature=1.0, top_p=1.0, top_k=2)
    assert set(drawn.tolist()) == {0, 1} and abs((drawn == 0).mean() - 0.5 / 0.8) < 0.05
    drawn = _draws(logits, temperature=1.0, top_p=0.7, top_k=0)  # 0.5 + 0.3 reaches 0.7
    assert set(drawn.tolist()) == {0, 1}
    assert set(_draws(logits, temperature=1.0, top_p=0.4, top_k=0).tolist()) == {0}
    all_four = _draws(logits, temperature=1.0, top_p=1.0, top_k=0)
    assert set(all_four.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(all_four, _draws(logits, temperature=1.0, top_p=1.0, top_k=0))


def test_first_max_index_is_argmax_and_the_draw_is_categoricals():
    """The sampler's argmax (reductions over blocks of the vocabulary) equals jnp.argmax — ties to the first, NaN
    first (also where a larger number comes before it, and in a later block), infinities, bfloat16 and float32,
    vocabulary-sized rows and a prime-sized one (blocks of one) — and its draw equals jax.random.categorical's with
    the same key."""
    rng = np.random.default_rng(11)
    rows = rng.normal(size=(7, 201088)).astype(np.float32)
    rows[1, [5, 70000, 201087]] = 9.0  # a tie: the first wins
    rows[2, 3] = 50.0  # NaN: the first NaN, as argmax, though a number before it is the largest
    rows[2, [70300, 1000]] = np.nan
    rows[3, :] = -np.inf
    rows[4, [17, 100]] = np.inf
    rows[5, :] = np.round(rows[5], 1)  # many ties, more in bfloat16
    rows[6, [150000, 200000]] = 9.0  # a tie in later blocks
    for dtype in (jnp.float32, jnp.bfloat16):
        for values in (jnp.asarray(rows, dtype), jnp.asarray(rows[:, :101], dtype)):
            np.testing.assert_array_equal(first_max_index(values), jnp.argmax(values, axis=-1))
    logits = jnp.asarray(rng.normal(scale=3.0, size=(64, 40)), jnp.float32)
    drawn = _draws(logits, temperature=1.0, top_p=1.0, top_k=0, seed=5)
    expected = [jax.random.categorical(jax.random.fold_in(jax.random.key(5), step), logits[step])
                for step in range(64)]
    np.testing.assert_array_equal(drawn, expected)
    assert len(set(drawn.tolist())) > 10  # draws, not one token


def test_each_row_samples_with_its_own_settings_and_key_as_alone():
    """The one sampler takes each row's own settings and key (seed, step): a row draws what it draws alone, in
    any batch; and over many steps, the frequencies of the distribution that temperature, top_k and top_p leave
    (bound: 5 standard errors)."""
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(scale=2.0, size=(5, 50)), jnp.float32)
    settings = {"temperature": jnp.asarray([0.7, 1.0, 1.3, 0.0, 1.0]), "top_p": jnp.asarray([0.9, 1.0, 0.5, 1.0, 0.8]),
                "top_k": jnp.asarray([0, 5, 0, 0, 3]), "seed": jnp.asarray([1, 2, 3, 4, 5])}
    steps = jnp.asarray([0, 3, 7, 2, 9])
    drawn = np.asarray(_sample_rows(logits, steps=steps, **settings))
    assert drawn[3] == int(jnp.argmax(logits[3]))
    for row in range(5):
        alone = _sample_rows(logits[row:row + 1], steps=steps[row:row + 1],
                             **{name: value[row:row + 1] for name, value in settings.items()})
        assert drawn[row] == int(alone[0]), row

    draws = 4000
    row = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    many = _draws(jnp.repeat(row, draws, axis=0), temperature=0.8, top_p=0.9, top_k=4, seed=7)
    kept = np.exp(np.asarray(row[0, :4]) / 0.8)
    kept /= kept.sum()  # top_k = 4, then the smallest head of them reaching top_p = 0.9
    head = int(np.searchsorted(np.cumsum(kept), 0.9)) + 1
    expected = np.zeros(6)
    expected[:head] = kept[:head] / kept[:head].sum()
    frequencies = np.bincount(many, minlength=6) / draws
    assert np.all(np.abs(frequencies - expected) <= 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-12)


def test_seeded_sampling_is_reproducible(pair):
    _, model = pair
    generator = Generator(model)
    a = generator.generate([[1, 2, 3]], 10, temperature=1.0, seed=3, stop_tokens=[])
    assert a == generator.generate([[1, 2, 3]], 10, temperature=1.0, seed=3, stop_tokens=[])
    assert a != generator.generate([[1, 2, 3]], 10, temperature=1.0, seed=4, stop_tokens=[])


def test_per_row_seeds_make_a_row_independent_of_its_batch(pair):
    _, model = pair
    generator = Generator(model)
    alone = generator.generate([[4, 5, 6]], 10, temperature=1.0, seed=[7], stop_tokens=[])[0]
    batched = generator.generate([[1, 2, 3], [4, 5, 6], [8, 9]], 10, temperature=1.0, seed=[3, 7, 9], stop_tokens=[])
    assert batched[1] == alone and batched[0] != alone
    assert batched[0] == generator.generate([[1, 2, 3]], 10, temperature=1.0, seed=[3], stop_tokens=[])[0]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generator.generate([[1], [2], [3]], 4, seed=[1, 2])


def test_a_repeated_prompt_is_prefilled_once_and_each_row_samples_as_alone(pair, monkeypatch):
    """GRPO's groups and n > 1 ask one prompt many times: it is prefilled once (2 distinct rows here, not 5) and
    its cache spread to every row; each row then draws exactly what it draws alone."""
    _, model = pair
    generator = Generator(model)
    prefilled = []
    prefill, decode, extend = generator.steps
    monkeypatch.setattr(generator, "steps", (lambda state, tokens, cache: prefilled.append(tokens.shape[0])
                                             or prefill(state, tokens, cache), decode, extend))
    prompts, seeds = [[1, 2, 3], [4, 5], [1, 2, 3], [1, 2, 3], [4, 5]], [11, 12, 13, 14, 15]
    together = generator.generate(prompts, 8, temperature=1.0, seed=seeds, stop_tokens=[])
    assert prefilled == [2]
    for prompt, seed, row in zip(prompts, seeds, together, strict=True):
        assert generator.generate([prompt], 8, temperature=1.0, seed=[seed], stop_tokens=[])[0] == row
    assert together[0] != together[2]  # same prompt, other seed


def test_rows_beyond_the_slots_take_the_slots_finished_rows_free_and_generate_as_alone(pair, monkeypatch):
    """Continuous batching in `generate`: with 2 slots, 5 rows of different lengths and limits run at most 2 at a
    time, a finished row's slot taken by the next, and each row's tokens (sampled with its seed) are those of all 5
    at once."""
    _, model = pair
    generator = Generator(model)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 300, n).tolist() for n in (3, 9, 5, 12, 7)]
    new, seeds = [2, 9, 4, 1, 6], [21, 22, 23, 24, 25]
    together = generator.generate(prompts, new, temperature=1.0, seed=seeds, stop_tokens=[])
    decoded = []
    prefill, decode, extend = generator.steps
    monkeypatch.setattr(generator, "steps", (prefill, lambda state, tokens, cache, live: decoded.append(
        int(np.sum(live))) or decode(state, tokens, cache, live), extend))
    assert generator.generate(prompts, new, temperature=1.0, seed=seeds, stop_tokens=[], slots=2) == together
    assert [len(row) for row in together] == new
    # both slots busy from the start; every token fed once (a row's last token is returned, never fed)
    assert max(decoded) == 2 and sum(decoded) == sum(new) - len(new) and decoded[:3] == [2, 2, 2]


def test_extending_a_cache_equals_prefilling_the_whole_sequence(pair):
    """Rows of a prefilled cache extended by chunks of their own lengths (one longer than the window of 5, one of
    a single token; the batch padded on the right): the logits after each row's chunk, and those of the next
    decode steps, equal a prefill of prompt + chunk from scratch (relative error < 1e-5, float32)."""
    _, model = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n).tolist() for n in (9, 3, 6)]
    chunks = [rng.integers(0, 300, n).tolist() for n in (7, 1, 3)]

    def prefilled(sequences, capacity):
        longest = max(map(len, sequences))
        tokens = np.zeros((len(sequences), longest), np.int32)
        for row, sequence in enumerate(sequences):
            tokens[row, longest - len(sequence):] = sequence
        empty = model.init_cache(jnp.asarray([longest - len(s) for s in sequences]), capacity)
        return model.prefill(jnp.asarray(tokens), empty)

    _, cache = prefilled(prompts, 9 + 7 + 6)
    chunk = np.zeros((3, 7), np.int32)
    for row, tokens in enumerate(chunks):
        chunk[row, : len(tokens)] = tokens
    logits, cache = model.extend(jnp.asarray(chunk), jnp.asarray([len(c) for c in chunks]), cache)
    expected, reference = prefilled([p + c for p, c in zip(prompts, chunks, strict=True)], 16 + 6)
    assert relative_error(np.asarray(logits), np.asarray(expected)) < 1e-5
    for _ in range(5):
        chosen = jnp.argmax(expected, axis=-1).astype(jnp.int32)
        logits, cache = model.decode(chosen, cache)
        expected, reference = model.decode(chosen, reference)
        assert relative_error(np.asarray(logits), np.asarray(expected)) < 1e-5


def test_a_kept_slot_goes_on_as_a_prefill_of_its_whole_sequence_does(pair):
    """Requests that stopped at different steps (a stop token that ends one early) keep their slots untouched
    while the others decode; going on with appended chunks of different lengths (every slot grown to hold them,
    a ring shorter than the window of 5 with them), each generates what `generate` on its whole sequence
    generates, and `fed` counts what each slot holds."""
    _, model = pair
    generator = Generator(model)
    engine = Engine(model, slots=2, max_length=64, capacity=3, split=(generator.graphdef, generator.state),
                    steps=generator.steps)
    assert engine.cache.window == 3
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 300, n).tolist() for n in (8, 4)]
    first = generator.generate(prompts, 6, stop_tokens=[])[0]
    kept = [Request(prompt, 6, stop_tokens=(first[2],), keep=True) for prompt in prompts]
    engine.run(kept)
    outputs = [request.tokens for request in kept]
    assert len(outputs[0]) == 3 and [engine.fed(r.slot) for r in kept] == [8 + 2, 4 + len(outputs[1]) - 1]
    assert engine.capacity == 32 and engine.cache.window == 5  # a bucket of 16 and 6 new tokens
    appended = [[outputs[0][-1], *rng.integers(0, 300, 7).tolist()], [outputs[1][-1], 5]]
    going = [Request(chunk, 5, slot=request.slot, keep=True) for request, chunk in zip(kept, appended, strict=True)]
    engine.run(going)
    for prompt, output, chunk, request in zip(prompts, outputs, appended, going, strict=True):
        whole = prompt + output[:-1] + chunk
        assert request.tokens == generator.generate([whole], 5, stop_tokens=[])[0]
    # one new token: the chunk is prefilled once and that token is the whole output
    once = Request([going[1].tokens[-1], 7], 1, slot=going[1].slot)
    engine.run([once])
    whole = prompts[1] + outputs[1][:-1] + appended[1] + going[1].tokens[:-1] + [going[1].tokens[-1], 7]
    assert once.tokens == generator.generate([whole], 1, stop_tokens=[])[0] and len(once.tokens) == 1
    assert engine.fed(once.slot) == len(whole)
    with pytest.raises(ValueError, match="slot 1 holds no kept request to go on from"):
        engine.run([Request([1], 2, slot=1)])  # ended without keep: freed
    for bad in (300, 100000, -1):  # appended ids are checked as a prompt's are, never clamped
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
            engine.run([Request([going[0].tokens[-1], bad], 2, slot=going[0].slot)])


def test_bad_requests(pair):
    _, model = pair
    generator = Generator(model)
    with pytest.raises(ValueError, match=r"prompt 0 needs 20 positions with its new tokens \(12 \+ 8\); the cache "
                                         r"holds 16"):
        generator.generate([list(range(12))], 8, cache_length=16)
    with pytest.raises(ValueError, match="no empty prompt"):
        generator.generate([[1], []], 4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\), got 1..300"):
        generator.generate([[1, 300]], 4)
    with pytest.raises(ValueError, match=r"one count >= 0, or one per row \(2\)"):
        generator.generate([[1], [2]], [4])
    with pytest.raises(ValueError, match="slots: at least 1, got 0"):
        generator.generate([[1], [2]], 4, slots=0)
    with pytest.raises(ValueError, match="bad sampling settings"):
        generator.generate([[1], [2]], 2, temperature=-1)


# (prompt tokens, new tokens) for a 64-position server cache: each side of the prefill buckets' edges (16, 32, 64),
# and requests that fill the context exactly, where a prompt padded to its bucket leaves too little room.
EDGES = [(15, 8), (17, 8), (32, 8), (33, 8), (40, 20), (40, 24), (17, 47), (63, 1), (1, 63)]


def test_server_engine_decodes_like_generate_at_every_bucket_and_context_edge(pair):
    _, model = pair
    generator, engine = Generator(model), Engine(model, slots=2, max_length=64).start()
    rng = np.random.default_rng(5)
    requests = [Request(rng.integers(0, 300, n).tolist(), new) for n, new in EDGES]
    finished = []
    try:
        for request in requests:
            request.on_done = finished.append
            engine.submit(request)
        deadline = time.time() + 300
        while len(finished) < len(requests) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop()
    assert finished == ["length"] * len(requests)
    for (length, new), request in zip(EDGES, requests, strict=True):
        expected = generator.generate([request.prompt], new, stop_tokens=[])[0]
        assert request.tokens == expected, (length, new)
    with pytest.raises(ValueError, match="asks for up to 25 more, but this server's context holds 64 tokens"):
        engine.submit(Request(list(range(40)), 25))


def _run_engine(engine, requests, timeout=300):
    """Submits every request before the engine starts (they are admitted in one step), waits for their ends."""
    ends = []
    for request in requests:
        request.on_done = ends.append
        engine.submit(request)
    engine.start()
    try:
        deadline = time.time() + timeout
        while len(ends) < len(requests) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop()
    return ends


def test_requests_admitted_together_share_one_prefill_per_bucket_and_decode_as_alone(pair):
    """Five requests arriving together: two prompt buckets (16 and 32 positions), two requests with the same
    prompt (one prefill row), so two prefills of [2, 16] and [2, 32] rows; each decodes as `generate` alone."""
    _, model = pair
    engine = Engine(model, slots=8, max_length=64)
    prefilled = []
    prefill = engine._prefill
    engine._prefill = lambda state, tokens, cache: prefilled.append(tokens.shape) or prefill(state, tokens, cache)
    rng = np.random.default_rng(9)
    short, other, long = (rng.integers(0, 300, n).tolist() for n in (5, 14, 20))
    requests = [Request(short, 8), Request(other, 6), Request(short, 8), Request(long, 7), Request(long[:18], 9)]
    assert _run_engine(engine, requests) == ["length"] * 5
    assert sorted(prefilled) == [(2, 16), (2, 32)]
    generator = Generator(model)
    for request in requests:
        assert request.tokens == generator.generate([request.prompt], request.max_tokens, stop_tokens=[])[0]


def test_penalties_and_logit_bias_change_the_logits_as_openai_defines_them(pair):
    """Greedy decoding under presence / frequency penalties (over the generated tokens) and a logit bias, against
    a loop that recomputes the whole sequence's logits and applies OpenAI's formula in numpy:
    logit[t] + bias[t] - presence * (count[t] > 0) - frequency * count[t]."""
    _, model = pair
    prompt, new = np.random.default_rng(4).integers(0, 300, 9).tolist(), 10
    plain = Generator(model).generate([prompt], new, stop_tokens=[])[0]
    settings = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0, frequency_penalty=-0.5),
                dict(logit_bias={7: 3.0, plain[0]: -100.0})]  # the greedy choice banned
    requests = [Request(prompt, new, **kwargs) for kwargs in settings]
    assert _run_engine(Engine(model, slots=4, max_length=64), requests) == ["length"] * 3
    graphdef, state = nnx.split(model)
    # Causal: the logits at the last real position ignore the zeros after it, so one shape compiles once.
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
    for kwargs, request in zip(settings, requests, strict=True):
        tokens, counts = list(prompt), np.zeros(300)
        for _ in range(new):
            logits = np.asarray(forward(state, jnp.asarray([tokens + [0] * (32 - len(tokens))]))[len(tokens) - 1],
                                np.float64)
            for token, bias in kwargs.get("logit_bias", {}).items():
                logits[token] += bias
            logits -= kwargs.get("presence_penalty", 0) * (counts > 0) + kwargs.get("frequency_penalty", 0) * counts
            tokens.append(int(np.argmax(logits)))
            counts[tokens[-1]] += 1
        assert request.tokens == tokens[len(prompt):], kwargs
        assert request.tokens != plain, kwargs  # the settings made a difference
    assert plain[0] not in requests[2].tokens
    # added in float32 whatever the model's dtype: in bfloat16, 20 - 0.05 would stay 20
    adjusted = gptoss_jax.engine._adjust(jnp.asarray([[20.0, 1.0]], jnp.bfloat16), jnp.asarray([[0]]),
                                         jnp.asarray([[-0.05]]))
    assert adjusted.dtype == jnp.float32 and abs(float(adjusted[0, 0]) - 19.95) < 1e-5


def test_a_request_cancelled_while_queued_is_never_run(pair):
    _, model = pair
    engine = Engine(model, slots=1, max_length=64)
    first, second, ends = Request([1, 2, 3], 8), Request([4, 5], 8), {}
    first.on_done, second.on_done = (lambda reason: ends.update(first=reason)), (lambda r: ends.update(second=r))
    engine.submit(first)
    engine.submit(second)
    engine.cancel(second)  # the client left while its request waited for a slot
    engine.start()
    try:
        deadline = time.time() + 120
        while len(ends) < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop()
    assert ends == {"first": "length", "second": "cancelled"} and len(first.tokens) == 8 and second.tokens == []


def test_a_kept_slot_goes_on_in_the_server_loop_as_a_fresh_prefill_and_frees_when_released(pair):
    """The server's tool turns: a request made with keep=True keeps its slot (and cache) when it ends, while another
    request decodes beside it; a request given that slot appends a chunk (the last token, sampled but never fed,
    then 6 more) and generates what `generate` on the whole sequence does, needing no free slot (the other one is
    busy); `cancel` of the kept request releases its slot."""
    _, model = pair
    rng = np.random.default_rng(12)
    prompt, other = rng.integers(0, 300, 11).tolist(), rng.integers(0, 300, 20).tolist()
    engine, ends = Engine(model, slots=2, max_length=64).start(), []
    try:
        def finished(requests, timeout=120):
            deadline = time.time() + timeout
            while len(ends) < requests and time.time() < deadline:
                time.sleep(0.02)
            return list(ends)

        def end_of(name):  # which request ended, with its reason (the engine's thread may end two between polls)
            return lambda reason: ends.append((name, reason))

        first, beside = Request(prompt, 5, keep=True, on_done=end_of("first")), Request(other, 40,
                                                                                         on_done=end_of("beside"))
        engine.submit(first)
        engine.submit(beside)
        assert finished(1)[0] == ("first", "length") and first.slot in engine.kept
        chunk = [first.tokens[-1], *rng.integers(0, 300, 6).tolist()]
        going_on = Request(chunk, 7, keep=True, slot=first.slot, on_done=end_of("going on"))
        engine.submit(going_on)
        assert sorted(finished(3)) == [("beside", "length"), ("first", "length"), ("going on", "length")]
        assert going_on.slot == first.slot and engine.fed(first.slot) == len(prompt) + 4 + len(chunk) + 6
        engine.cancel(going_on)  # released: the slot takes the next request
        last = Request(other[:5], 3, on_done=end_of("last"))
        engine.submit(last)
        assert finished(4)[-1] == ("last", "length") and last.slot is not None and not engine.kept
    finally:
        engine.stop()
    generator = Generator(model)
    assert going_on.tokens == generator.generate([prompt + first.tokens[:-1] + chunk], 7, stop_tokens=[])[0]
    assert beside.tokens == generator.generate([other], 40, stop_tokens=[])[0]


def test_server_context_defaults_to_the_smaller_of_8192_and_the_model():
    config = GptOssConfig.tiny().replace(vocab_size=300, num_hidden_layers=2, max_position_embeddings=64)
    model = gptoss_jax.GptOss(config, dtype="float32", rngs=nnx.Rngs(0))
    assert Engine(model, slots=1).max_length == 64
    with pytest.raises(ValueError, match="max_length 128 exceeds the model's 64"):
        Engine(model, slots=1, max_length=128)


def _harmony_checkpoint(directory):
    """A random model with the real vocabulary, so harmony prompts fit."""
    random_hf_model(seed=2, num_hidden_layers=2, vocab_size=201088).save_pretrained(directory)
    return directory


def test_generate_command_prints_the_answer_and_speed(tmp_path):
    checkpoint = _harmony_checkpoint(tmp_path / "ckpt")
    command = [sys.executable, "-m", "gptoss_jax.cli", "generate", "--checkpoint", str(checkpoint), "--prompt",
               "Hi", "--reasoning-effort", "low", "--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # the rate excludes the first token's wait (the prefill and the compiles)
    assert re.search(r"\[6 tokens in [\d.]+s \(first after [\d.]+s, [\d.]+ tokens/s after it\)",
                     result.stderr), result.stderr[-2000:]


def _without_gloo_notices(text: str) -> str:
    """`text` without gloo's connection notice, printed from C++: its two sentences can land on either side of
    Python's "you> ", or one inside the other (removing it then joins the other's halves: so again, until none is
    left), and the rank is sometimes missing from it."""
    notice = (r"\[Gloo\] Rank \d* ?is connected to \d+ peer ranks\.[ \n]?"
              r"|Expected number of connected peer ranks is : \d+\n?")
    while (shorter := re.sub(notice, "", text)) != text:
        text = shorter
    return text


def test_chat_runs_across_two_processes_as_in_one(demo_model_dir):
    """A three-turn chat with the demo model on two jax.distributed processes (127.0.0.1, gloo) over one 4-device
    mesh, and in one process over the same mesh: process 0 prints the analysis and answers the single process
    prints, token for token; the other process prints nothing. The CLI's commands are not sent to the model: a
    banner says how to leave, /effort high changes the next turns' effort, /reset starts a new conversation (the
    same question after it is answered as the first time at that effort), /help lists them, /bogus is refused."""
    port, = free_ports(1)
    command = [sys.executable, "-m", "gptoss_jax.cli", "chat", "--checkpoint", str(demo_model_dir),
               "--max-new-tokens", "60", "--temperature", "0", "--dtype", "float32", "--mesh", "fsdp=4",
               "--show-analysis"]
    question = synthetic.counting_records(1)[0]["messages"][0]["content"]
    conversation = "\n".join([question, "/effort high", "/help", "/bogus", "/reset", question, "/reset", question,
                              "/exit"]) + "\n"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    processes = [subprocess.Popen(
        [*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(input=conversation if i == 0 else "", timeout=600) for i, p in enumerate(processes)]
    for process, (_, errors) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, errors[-3000:]
    single = subprocess.run(command, input=conversation, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert single.returncode == 0, single.stderr[-3000:]
    printed = [_without_gloo_notices(out) for out, _ in outputs]
    assert single.stdout.count("assistant>") == 3 and single.stdout.count("[final]") == 3
    assert printed[0] == single.stdout and printed[1] == ""
    assert single.stdout.startswith(f"gptoss-jax chat: {demo_model_dir}, reasoning effort medium. /help for "
                                    "commands, /exit or Ctrl-D to leave.")
    for shown in ("[reasoning effort high]", "/effort low|medium|high", "[not a command: '/bogus'; /help lists them]",
                  "[a new conversation]"):
        assert shown in single.stdout
    medium, high, again = (answer.split("you>")[0] for answer in single.stdout.split("assistant> ")[1:])
    assert high == again and high != medium  # high effort writes a longer analysis


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """A random model with the real vocabulary (harmony prompts), a window of 8 and a 512-position context."""
    _, model = hf_and_ours(tmp_path_factory.mktemp("vocab"), seed=5, vocab_size=201088, max_position_embeddings=512,
                           sliding_window=8)
    return Generator(model)


def test_a_row_generates_alone_what_it_generates_beside_rows_of_any_length(real_vocab):
    """Rows of 3, 60, 17 and 420 tokens (longer than the window; the last near the 512-position limit), each
    with its own new-token limit: greedy and sampled (a seed per row), every row's tokens are those it generates
    alone. Kept in its slot, the short row goes on as it does alone."""
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 200_000, n).tolist() for n in (3, 60, 17, 420)]
    new = [40, 12, 30, 90]  # the last row ends at 510 positions
    for settings in ({"temperature": 0.0}, {"temperature": 1.0, "seed": [11, 12, 13, 14]}):
        batched = real_vocab.generate(prompts, new, stop_tokens=[], **settings)
        for row, prompt in enumerate(prompts):
            alone = {**settings, "seed": [settings["seed"][row]]} if "seed" in settings else settings
            assert batched[row] == real_vocab.generate([prompt], new[row], stop_tokens=[], **alone)[0], row
        assert [len(o) for o in batched] == new
    # kept beside the others, the short row goes on with 200 new tokens as it does kept alone
    ended = []
    for rows in (prompts, prompts[:1]):
        engine = Engine(real_vocab.model, slots=len(rows), max_length=512, split=(real_vocab.graphdef,
                        real_vocab.state), steps=real_vocab.steps)
        kept = [Request(prompt, limit, keep=True) for prompt, limit in zip(rows, new, strict=False)]
        engine.run(kept)
        appended = [kept[0].tokens[-1], *np.random.default_rng(9).integers(0, 200_000, 5).tolist()]
        going = Request(appended, 200, slot=kept[0].slot)
        engine.run([going])
        ended.append(kept[0].tokens + going.tokens)
    assert ended[0] == ended[1] and len(ended[0]) == 40 + 200


def test_an_agent_conversation_ends_alone_as_it_ends_beside_one_near_the_context_limit(real_vocab):
    """The agent loop on a random model (real attention and caches): a short conversation batched beside one
    whose prompt nearly fills the 256-token context gets its own room — the same tokens and finish ("length",
    at its max_new_tokens) as alone; the long one ends "max_tokens" at the limit, its output cut inside a message
    header (random tokens never close one), which is a truncation, not an error."""
    rng = np.random.default_rng(9)
    words = " ".join(f"w{n}" for n in rng.integers(0, 10_000, 60))  # a 230-token prompt
    records = [{"messages": [{"role": "user", "content": "Hi."}]}, {"messages": [{"role": "user", "content": words}]}]
    settings = {"max_tokens": 256, "max_new_tokens": 60, "temperature": 0.0}
    short, long = agent.run(real_vocab, records, [{}, {}], **settings)
    (alone,) = agent.run(real_vocab, records[:1], [{}], **settings)
    assert short.tokens == alone.tokens and short.finish == alone.finish == "length"
    assert len(short.tokens) - len(harmony.encode_chat(records[0])) == 60
    assert long.finish == "max_tokens" and len(long.tokens) == 256
    assert harmony.parse(long.tokens[len(harmony.encode_chat(records[1])):], role="assistant").error == HEADER_CUT


def test_a_decode_step_copies_no_whole_cache(pair):
    """The compiled decode step (batch 4, 512 slots) writes its new position into the donated cache in place:
    no instruction writes an array the size of a key/value stack (the check finds one in a program that
    transposes the cache, as XLA did each step while the cache kept positions before heads). Float32: on a CPU,
    XLA still copies a bfloat16 stack through the integer view its update takes (see `model._scatter`)."""
    _, model = pair
    graphdef, state = nnx.split(model)
    _, decode, _ = gptoss_jax.engine.compiled_steps(graphdef)
    cache = model.init_cache(jnp.zeros(4, jnp.int32), 512)
    compiled = decode.lower(state, jnp.zeros(4, jnp.int32), cache).compile()
    assert whole_cache_copies(compiled.as_text(), cache) == []
    transposed = jax.jit(lambda c: jnp.swapaxes(c.full_k, 2, 3) * 2).lower(cache).compile()
    assert len(whole_cache_copies(transposed.as_text(), cache)) == 1


def test_inference_on_a_cpu_reads_each_layers_bfloat16_weights_where_they_lie():
    """A bfloat16 model on a CPU (its layer loop unrolled): `split_for_inference` holds each block weight stack as
    per-layer arrays viewing the stack's memory, with which prefill, decode and extend give bit for bit what the
    stacks give (the forward a score takes: to bf16's rounding), and the compiled decode step writes no copy of an
    attention weight (the stacks' own step writes one for every layer: the check can fail); also on a one-device
    mesh."""
    # weight sizes no 3-row array has
    config = GptOssConfig.tiny().replace(num_hidden_layers=3, hidden_size=128, vocab_size=4096)
    model = nnx.eval_shape(lambda: gptoss_jax.GptOss(config, dtype="bfloat16", rngs=nnx.Rngs(0)))

    @jax.jit
    def random(key):  # biases and sinks non-zero too
        shapes = nnx.state(model, nnx.Param)
        keys = iter(jax.random.split(key, len(jax.tree.leaves(shapes))))
        return jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), shapes)

    nnx.update(model, random(jax.random.key(4)))
    graphdef, split = split_for_inference(model)
    _, stacked = nnx.split(model)
    for kind in ("banded_blocks", "full_blocks"):
        for name in ("wq", "wk", "wv", "wo"):
            per_layer = split[kind]["attn"][name].get_value()
            stack = getattr(getattr(model, kind).attn, name).get_value()
            assert isinstance(per_layer, LayerArrays) and len(per_layer.layers) == stack.shape[0]
            assert [a.unsafe_buffer_pointer() for a in per_layer.layers] == [
                stack.unsafe_buffer_pointer() + i * per_layer.layers[0].nbytes for i in range(stack.shape[0])]

    prefill, decode, extend = gptoss_jax.engine.compiled_steps(graphdef)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 4000, (3, 40)), jnp.int32)
    start = jnp.array([0, 9, 31], jnp.int32)  # prompts longer than the window (32) and short ones
    attention_weights = {getattr(model.banded_blocks.attn, name).get_value()[0].size for name in ("wq", "wk")}
    hidden = jax.jit(lambda state, tokens: nnx.merge(graphdef, state).hidden_states(tokens)[0])
    results, copies = [], []
    for state in (split, stacked):
        logits, cache = prefill(state, tokens, model.init_cache(start, 64))
        step = decode.lower(state, jnp.zeros(3, jnp.int32), cache).compile()
        copies.append(arrays_written(step.as_text(), lambda shape: math.prod(shape) in attention_weights))
        stepped, cache = step(state, jnp.array([5, 7, 11], jnp.int32), cache)
        extended, cache = extend(state, tokens[:, :6], jnp.array([6, 2, 4], jnp.int32), cache)
        results.append((logits, stepped, extended, cache, hidden(state, tokens)))
    for ours, theirs in zip(*map(jax.tree.leaves, [r[:4] for r in results]), strict=True):
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
    assert copies[0] == [] and len(copies[1]) >= 2 * config.num_hidden_layers
    # the forward a score takes: per-layer arrays make it a Python loop, which XLA computes in bf16 where the
    # stacks' scan computes in float32 (see `_unroll_inference`): equal to within bfloat16's roundings
    assert relative_error(results[0][4], results[1][4]) < 5e-2  # measured 2.2e-2 over three layers

    # placed on a one-device mesh (as `--mesh tensor=1`, or GRPO's model): each layer keeps the stack's mesh
    sharding.shard_model(model, sharding.make_mesh({"tensor": 1}))
    graphdef, on_mesh = split_for_inference(model)
    wq, stack = on_mesh["banded_blocks"]["attn"]["wq"].get_value(), model.banded_blocks.attn.wq.get_value()
    assert isinstance(wq, LayerArrays) and tuple(wq[0].sharding.spec) == tuple(stack.sharding.spec)[1:]
    np.testing.assert_array_equal(np.asarray(prefill(on_mesh, tokens, model.init_cache(start, 64))[0], np.float32),
                                  np.asarray(results[0][0], np.float32))
