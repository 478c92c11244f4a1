"""The training objective against independent references: token losses against transformers' loss, gradient
accumulation against one larger batch, the router losses against float64 numpy, LoRA dropout's scale."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gptoss_jax.lora import LoraConfig, add_lora
from gptoss_jax.model import LoRA, LoRAParam
from gptoss_jax.moe import router_losses
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import trainer
from gptoss_jax.train.config import load_config

from helpers import relative_error
from hf_models import hf_and_ours

DEMO = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_demo.py"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random transformers model and ours loaded from its checkpoint, float32."""
    return hf_and_ours(tmp_path_factory.mktemp("loss"), seed=7, num_hidden_layers=2, sliding_window=4)


def _examples(rng, lengths):
    """Examples of random tokens whose loss mask trains a random tail (the "assistant" part) of each."""
    examples = []
    for length in lengths:
        mask = np.zeros(length, bool)
        mask[rng.integers(1, length - 1):] = True
        examples.append(data_lib.Example(rng.integers(0, 300, length).astype(np.int32), mask, "test"))
    return examples


def _steps(model, **overrides):
    """The trainer's compiled steps for full fine-tuning of `model`, and its parameters."""
    settings = {"model.param_dtype": "float32", **overrides}
    config = load_config(DEMO, [f"--config.{key}={value}" for key, value in settings.items()])
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    transform, schedule = trainer.make_optimizer(config, params)
    steps = trainer.make_steps(config, graphdef, jax.tree.map(lambda a: a.dtype, params), transform, schedule)
    return steps, params, frozen


def _batch(rows: data_lib.PackedRows) -> dict:
    return {name: jnp.asarray(getattr(rows, name)) for name in ("inputs", "targets", "weights", "segment_ids",
                                                                 "positions")}


def test_packed_token_losses_equal_transformers_loss(pair):
    """Three examples packed in a row of 40 (prompt tokens ignored, padding at the end): each trained token's
    loss, and the step's mean loss, equal transformers' on each example alone with labels -100 on its prompt."""
    hf, model = pair
    examples = _examples(np.random.default_rng(0), [14, 9, 12])
    rows = data_lib.pack(examples, 40, shuffle="none")
    assert len(rows) == 1 and (rows.segment_ids == 0).any() and (rows.weights == 0).any()

    expected_tokens, expected_sum, counted = [], 0.0, 0
    for example in examples:
        labels = np.where(example.mask, example.tokens, -100)
        with torch.no_grad():
            output = hf(torch.tensor(example.tokens[None], dtype=torch.long),
                        labels=torch.tensor(labels[None], dtype=torch.long))
        per_token = torch.nn.functional.cross_entropy(output.logits[0, :-1], torch.tensor(labels[1:], dtype=torch.long),
                                                      ignore_index=-100, reduction="none")
        expected_tokens.append(per_token.numpy()[example.mask[1:]])
        expected_sum += output.loss.item() * example.mask[1:].sum()  # transformers averages over its labels
        counted += example.mask[1:].sum()

    batch = _batch(rows)
    hidden, _ = model.hidden_states(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    one_token_each = jnp.eye(rows.weights.size, dtype=jnp.float32).reshape(-1, *rows.weights.shape)
    per_token = jax.vmap(lambda w: trainer.token_losses(hidden, model.unembedding[...], batch["targets"], w))(
        one_token_each)
    ours = np.asarray(per_token)[rows.weights.reshape(-1) > 0]
    assert relative_error(ours, np.concatenate(expected_tokens)) <= 1e-5

    steps, params, frozen = _steps(model)
    _, loss, _ = steps.gradients(params, frozen, batch, jnp.int32(0))
    assert relative_error(loss, expected_sum / counted) <= 1e-5


def test_gradient_accumulation_equals_one_larger_batch(pair):
    """grad_accum = 4 over 4 rows gives the gradients (and loss) of one batch of 4 rows. The z-loss, a mean over
    tokens, is averaged over equal micro-batches: the same. (The load-balancing loss is per micro-batch, as in
    transformers, so it is off here.)"""
    _, model = pair
    rows = data_lib.pack(_examples(np.random.default_rng(1), [17, 11, 23, 8, 19, 14, 9]), 32, shuffle="none")
    batch = _batch(data_lib.PackedRows(*(getattr(rows, name)[:4] for name in ("inputs", "targets", "weights",
                                                                              "segment_ids", "positions"))))
    assert len(rows) >= 4
    results = {}
    for accum in (1, 4):
        steps, params, frozen = _steps(model, **{"optimizer.grad_accum": accum, "loss.z_loss_weight": 0.01,
                                                 "loss.aux_loss_weight": 0.0, "data.batch_size": 4 // accum})
        results[accum] = steps.gradients(params, frozen, batch, jnp.int32(0))
    (one, loss_one, router_one), (four, loss_four, router_four) = results[1], results[4]
    assert relative_error(loss_four, loss_one) <= 1e-6 and relative_error(router_four[0], router_one[0]) <= 1e-6
    for accumulated, whole in zip(jax.tree.leaves(four), jax.tree.leaves(one), strict=True):
        if np.abs(np.asarray(whole)).max() > 0:
            assert relative_error(accumulated, whole) <= 1e-5
        else:  # embedding rows of tokens not in the batch
            assert not np.asarray(accumulated).any()


def test_router_losses_equal_float64_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(50, 8)).astype(np.float32)
    experts = np.argsort(-logits, axis=-1)[:, :4]  # top-4, as routing picks them
    z_loss, balance = np.asarray(router_losses(jnp.asarray(logits), jnp.asarray(experts)), np.float64)

    wide = logits.astype(np.float64)
    partition = np.log(np.exp(wide).sum(axis=-1))
    probabilities = np.exp(wide - partition[:, None])
    share = np.array([(experts == e).sum() for e in range(8)]) / experts.size
    assert relative_error(z_loss, np.mean(partition**2)) <= 1e-6
    assert relative_error(balance, 8 * np.sum(share * probabilities.mean(axis=0))) <= 1e-6
    uniform = router_losses(jnp.zeros((64, 8)), jnp.asarray(np.arange(256).reshape(64, 4) % 8))
    assert relative_error(uniform[1], 1.0) <= 1e-6  # balanced routing scores exactly 1


def test_lora_dropout_keeps_the_expected_scale():
    """Dropout on the adapter's input zeroes a share p of it and scales the rest by 1/(1-p): averaged over many
    keys, the adapter's output is the one without dropout (bound: 5 standard errors of the mean), and each draw
    zeroes about p of the inputs."""
    rng = np.random.default_rng(3)
    p, draws = 0.25, 4000
    adapter = LoRA(LoRAParam(jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)),
                   LoRAParam(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)), inputs=16, scaling=2.0, dropout=p)
    x = jnp.asarray(rng.normal(size=(3, 16)), jnp.float32)
    exact = np.asarray(adapter(x, "ni,ir->nr", "nr,ro->no"))
    keys = jax.random.split(jax.random.key(0), draws)
    dropped = np.asarray(jax.vmap(lambda key: adapter(x, "ni,ir->nr", "nr,ro->no", key))(keys))
    error = np.abs(dropped.mean(axis=0) - exact)
    assert np.all(error <= 5 * dropped.std(axis=0) / np.sqrt(draws))
    a_only = LoRA(LoRAParam(jnp.eye(16)), LoRAParam(jnp.eye(16)), inputs=16, scaling=1.0, dropout=p)
    kept = np.asarray(jax.vmap(lambda key: a_only(x, "ni,ir->nr", "nr,ro->no", key))(keys[:200])) != 0
    assert abs(kept.mean() - (1 - p)) <= 0.01
    assert relative_error(np.asarray(a_only(x, "ni,ir->nr", "nr,ro->no", keys[0]))[kept[0]],
                          np.asarray(x)[kept[0]] / (1 - p)) <= 1e-6


def test_lora_dropout_reaches_the_training_step(pair):
    """With dropout the step's adapter gradients change with the step's key, and without it they do not."""
    _, base = pair
    model = nnx.clone(base)
    add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.3), rngs=nnx.Rngs(0))
    rows = data_lib.pack(_examples(np.random.default_rng(4), [20, 15]), 40, shuffle="none")
    batch = _batch(rows)
    config = load_config(DEMO, ["--config.lora.enabled=true", "--config.lora.dropout=0.3",
                                "--config.model.param_dtype=float32"])
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    transform, schedule = trainer.make_optimizer(config, params)
    steps = trainer.make_steps(config, graphdef, jax.tree.map(lambda a: a.dtype, params), transform, schedule)
    first, second = (jax.tree.leaves(steps.gradients(params, frozen, batch, jnp.int32(step))[0]) for step in (0, 1))
    # (the A factors' gradients are zero while B is: nothing to compare there)
    assert any(relative_error(a, b) > 1e-3 for a, b in zip(first, second, strict=True) if np.any(b))
