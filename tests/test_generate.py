"""Generation: greedy equals transformers' generate(), cached decode equals full recomputation, sampling."""

import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptoss_jax
from gptoss_jax.generation import Generator, generate, sample

from helpers import relative_error
from hf_models import random_hf_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random transformers model (window 5) and ours loaded from its checkpoint, float32."""
    directory = tmp_path_factory.mktemp("gen")
    hf = random_hf_model(seed=21, num_hidden_layers=3, sliding_window=5)
    hf.save_pretrained(directory)
    return hf, gptoss_jax.load_model(directory, dtype="float32")


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


def test_sampling_settings():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    key = jax.random.key(0)
    greedy = sample(logits, key, temperature=0.0, top_p=1.0, top_k=0)
    assert np.all(np.asarray(greedy) == 0)
    drawn = np.asarray(sample(logits, key, temperature=1.0, top_p=1.0, top_k=2))
    assert set(drawn.tolist()) == {0, 1} and abs((drawn == 0).mean() - 0.5 / 0.8) < 0.05
    drawn = np.asarray(sample(logits, key, temperature=1.0, top_p=0.7, top_k=0))  # 0.5 + 0.3 reaches 0.7
    assert set(drawn.tolist()) == {0, 1}
    drawn = np.asarray(sample(logits, key, temperature=1.0, top_p=0.4, top_k=0))
    assert set(drawn.tolist()) == {0}
    all_four = np.asarray(sample(logits, key, temperature=1.0, top_p=1.0, top_k=0))
    assert set(all_four.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(all_four, np.asarray(sample(logits, key, temperature=1.0, top_p=1.0, top_k=0)))


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


def test_bad_requests(pair):
    _, model = pair
    generator = Generator(model)
    with pytest.raises(ValueError, match="a prompt of 12 tokens plus 8 new ones needs 20 positions; the cache holds"):
        generator.generate([list(range(12))], 8, cache_length=16)
    with pytest.raises(ValueError, match="no empty prompt"):
        generator.generate([[1], []], 4)
    with pytest.raises(ValueError, match=r"prompt 0: token ids must be in \[0, 300\)"):
        generator.generate([[1, 300]], 4)


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
    assert re.search(r"\[6 tokens in [\d.]+s, [\d.]+ tokens/s", result.stderr), result.stderr[-2000:]


def test_chat_and_generate_run_across_two_processes(tmp_path):
    """The same command on two jax.distributed processes (127.0.0.1, gloo): one mesh, output from process 0."""
    checkpoint = _harmony_checkpoint(tmp_path / "ckpt")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "gptoss_jax.cli", "chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "5",
         "--temperature", "0", "--dtype", "float32", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--mesh", "fsdp=4"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(input="Hello there\n/exit\n" if i == 0 else "", timeout=600)
               for i, p in enumerate(processes)]
    for process, (_, errors) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, errors[-3000:]
    assert "assistant>" in outputs[0][0] and "assistant>" not in outputs[1][0]
    assert "[5 tokens in" in outputs[0][1]
