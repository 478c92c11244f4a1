"""GRPO's advantages and loss against a float64 numpy reference on fixed log-probabilities and rewards, and the
gradient of one inner step without KL against the REINFORCE form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.train import grpo

RTOL = 1e-5  # float32 against float64
G = 4


def _batch(seed=0, prompts=3, length=7):
    rng = np.random.default_rng(seed)
    n = prompts * G
    rewards = rng.normal(size=n).round(1)
    old = -rng.uniform(0.1, 3.0, size=(n, length))
    logprobs = old + rng.normal(scale=0.4, size=(n, length))  # ratios well outside [0.8, 1.2] for some tokens
    ref = old + rng.normal(scale=0.3, size=(n, length))
    lengths = rng.integers(1, length + 1, size=n)
    mask = np.arange(length)[None, :] < lengths[:, None]
    return rewards, logprobs, old, ref, mask


def _advantages_reference(rewards, scale):
    groups = rewards.reshape(-1, G)
    centred = (groups - groups.mean(1, keepdims=True)).reshape(-1)
    if scale == "group":
        return centred / (np.repeat(groups.std(1, ddof=1), G) + 1e-4)
    return centred / (rewards.std(ddof=1) + 1e-4) if scale == "batch" else centred


def _loss_reference(logprobs, old, ref, advantages, mask, eps_low, eps_high, beta, normalisation, max_length):
    ratio = np.exp(logprobs - old)
    a = advantages[:, None]
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = np.exp(ref - logprobs) - (ref - logprobs) - 1
    per_token = per_token + beta * kl
    # TRL GRPOTrainer's three losses, as it writes them (a fully masked completion: 0, counted among the rows)
    if normalisation == "sequence":
        loss = ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
    elif normalisation == "token":
        loss = (per_token * mask).sum() / max(mask.sum(), 1)
    else:
        loss = (per_token * mask).sum() / (len(mask) * max_length)
    clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return loss, kl[mask].mean(), clipped[mask].mean()


@pytest.mark.parametrize("scale", grpo.SCALES)
def test_advantages_equal_the_reference_and_a_group_of_equal_rewards_gets_zero(scale):
    rewards = _batch()[0]
    rewards[:G] = 1.0  # the first prompt's completions all score the same
    got = np.asarray(grpo.group_advantages(jnp.asarray(rewards, jnp.float32), G, scale))
    expected = _advantages_reference(rewards, scale)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6)
    assert not got[:G].any()
    assert np.asarray(grpo.informative_groups(jnp.asarray(rewards), G)).tolist() == [False, True, True]


@pytest.mark.parametrize("normalisation", grpo.NORMALISATIONS)
@pytest.mark.parametrize("beta, eps_high, masked", [(0.0, 0.2, False), (0.04, 0.28, False), (0.0, 0.28, True)])
def test_loss_kl_and_clipping_equal_the_reference(normalisation, beta, eps_high, masked):
    rewards, logprobs, old, ref, mask = _batch(seed=1)
    if masked:  # a completion left out whole (overlong = "mask", or dynamic sampling)
        mask[[0, 5]] = False
    advantages = _advantages_reference(rewards, "group")
    settings = grpo.LossSettings(epsilon_low=0.2, epsilon_high=eps_high, beta=beta, normalisation=normalisation,
                                 max_completion_length=9)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    loss, metrics = grpo.policy_loss(f32(logprobs), f32(old), f32(advantages), jnp.asarray(mask), settings,
                                     ref_logprobs=f32(ref))
    expected, kl, clipped = _loss_reference(logprobs, old, ref, advantages, mask, 0.2, eps_high, beta,
                                            normalisation, 9)
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), clipped, rtol=RTOL)
    assert 0 < clipped < 1  # the fixture reaches both sides of the clip
    if beta:
        np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=RTOL)


@pytest.mark.parametrize("normalisation, trl", [("sequence", -0.25), ("token", -1 / 3), ("dr_grpo", -0.125)])
def test_a_fully_masked_completion_counts_as_trl_counts_it(normalisation, trl):
    """Four completions (2, 3, 0 and 1 tokens in the mask; advantages 1, 0, 1, 0; every ratio 1, so a token's
    loss is -A). TRL by hand: sequence (-1 + 0 + 0 + 0) / 4; token -2 / 6 tokens; dr_grpo -2 / (4 x 4). Leaving
    the masked one out of the count, as before, gave -1/3 and -1/6."""
    mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    advantages = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    zeros = jnp.zeros(mask.shape)
    settings = grpo.LossSettings(normalisation=normalisation, max_completion_length=4)
    np.testing.assert_allclose(float(grpo.policy_loss(zeros, zeros, advantages, mask, settings)[0]), trl, rtol=RTOL)


def test_one_inner_step_without_kl_is_reinforce():
    """With the sampling policy's own log-probabilities (ratio 1) and beta = 0, the gradient with respect to each
    sampled token's log-probability is -A_i / (N * |o_i|): REINFORCE with the group baseline."""
    rewards, _, old, _, mask = _batch(seed=2)
    advantages = _advantages_reference(rewards, "group")
    settings = grpo.LossSettings(normalisation="sequence")
    grad = jax.grad(lambda lp: grpo.policy_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(advantages,
                                                jnp.float32), jnp.asarray(mask), settings)[0])(
        jnp.asarray(old, jnp.float32))
    expected = -advantages[:, None] * mask / (len(mask) * mask.sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=RTOL, atol=1e-7)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="normalisation"):
        grpo.LossSettings(normalisation="mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.LossSettings(normalisation="dr_grpo")
    with pytest.raises(ValueError, match="beta > 0 needs"):
        grpo.policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                         grpo.LossSettings(beta=0.1))


def test_token_logprobs_and_their_gradients_equal_a_plain_log_softmax():
    """The chunked log-probabilities GRPO trains through (counted tokens first, uncounted chunks skipped, custom
    VJP) against log_softmax of the whole logits, values and gradients for hidden states and unembedding."""
    from gptoss_jax.train.loss import token_logprobs

    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(2, 150, 16)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(300, 16)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, size=(2, 150)), jnp.int32)
    counted = jnp.asarray(rng.random((2, 150)) < 0.3)
    cotangent = jnp.asarray(rng.normal(size=(2, 150)), jnp.float32)

    def plain(hidden, unembedding):
        logprobs = jax.nn.log_softmax(hidden @ unembedding.T, axis=-1)
        return jnp.where(counted, jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0], 0.0)

    chunked = lambda h, u: token_logprobs(h, u, targets, counted)  # noqa: E731
    np.testing.assert_allclose(chunked(hidden, unembedding), plain(hidden, unembedding), rtol=1e-5, atol=1e-5)
    weighted = lambda f: lambda h, u: jnp.sum(cotangent * f(h, u))  # noqa: E731
    got = jax.grad(weighted(chunked), argnums=(0, 1))(hidden, unembedding)
    expected = jax.grad(weighted(plain), argnums=(0, 1))(hidden, unembedding)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_training_forward_scores_sampled_tokens_as_the_model_does(temperature):
    """Completions sampled by the Generator, re-scored through completion_batch + sequence_logprobs (right-padded,
    chunked log-probabilities), equal log_softmax of the model's own logits / temperature on each unpadded
    sequence (f32): the distribution they were sampled from, as TRL scores them."""
    from flax import nnx

    import gptoss_jax
    from gptoss_jax.generation import Generator

    model = gptoss_jax.GptOss(gptoss_jax.GptOssConfig.tiny(), dtype="float32", rngs=nnx.Rngs(1))
    prompts = [[200006, 1428, 200008, 23, 45, 67], [200006, 1428, 200008, 89], [200006, 1428, 200008, 5, 6, 7, 8]]
    completions = Generator(model).generate(prompts, 12, temperature=temperature, seed=[1, 2, 3], stop_tokens=[])
    completions[1] = completions[1][:5]  # completions of different lengths
    batch = grpo.completion_batch(prompts, completions, 24)
    got = np.asarray(grpo.sequence_logprobs(model, {k: jnp.asarray(v) for k, v in batch.items()},
                                            temperature=temperature))
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        tokens = jnp.asarray([prompt + completion])
        logprobs = jax.nn.log_softmax(model(tokens)[0].astype(jnp.float32) / temperature, axis=-1)
        expected = np.asarray(logprobs[len(prompt) - 1:-1][jnp.arange(len(completion)), jnp.asarray(completion)])
        start = len(prompt) - 1
        np.testing.assert_allclose(got[row, start:start + len(completion)], expected, rtol=1e-5, atol=1e-5)
        assert not got[row, :start].any() and not got[row, start + len(completion):].any()
    assert batch["counted"].sum() == sum(map(len, completions))


def test_an_update_makes_rewarded_completions_likelier_and_the_reference_is_the_base():
    """LoRA on the tiny model: before any update the policy is its base (b = 0), so the k3 KL to the reference
    (adapters off: the LoRA parameters zeroed) is 0; one update with a positive advantage on one completion and a
    negative one on the other raises the first's log-probability and lowers the second's."""
    import optax
    from flax import nnx

    import gptoss_jax
    from gptoss_jax.lora import LoraConfig, add_lora
    from gptoss_jax.model import LoRAParam

    model = add_lora(gptoss_jax.GptOss(gptoss_jax.GptOssConfig.tiny(), dtype="float32", rngs=nnx.Rngs(2)),
                     LoraConfig(rank=4), rngs=nnx.Rngs(3))
    graphdef, master, frozen = nnx.split(model, LoRAParam, ...)
    dtypes = jax.tree.map(lambda a: a.dtype, master)
    transform = optax.adam(1e-2)
    settings = grpo.LossSettings(beta=0.1)
    steps = grpo.make_policy_steps(graphdef, dtypes, transform, settings)
    prompt = [200006, 1428, 200008, 23, 45]
    batch = {k: jnp.asarray(v) for k, v in grpo.completion_batch([prompt, prompt], [[11, 12, 13], [21, 22]],
                                                                  12).items()}
    old = steps.logprobs(master, frozen, batch)
    ref = steps.logprobs(jax.tree.map(jnp.zeros_like, master), frozen, batch)
    np.testing.assert_allclose(old, ref, atol=1e-6)
    new_master, _, metrics = steps.update(jax.tree.map(jnp.copy, master), transform.init(master), frozen, batch,
                                          old, ref, jnp.asarray([1.0, -1.0]))
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6) and float(metrics["clip_fraction"]) == 0.0
    moved = steps.logprobs(new_master, frozen, batch).sum(-1) - old.sum(-1)
    assert float(moved[0]) > 0 > float(moved[1])


def test_micro_batches_and_the_sampling_policy_by_default_give_the_same_update():
    """An update over 2 micro-batches equals one over the whole batch (the normalisation is the batch's: the
    sequence normalisation, whose weights depend on each completion's length and on the number of completions, is
    the one a per-piece average would get wrong); and `old=None` (one inner step: the policy that sampled is this
    one) equals passing its log-probabilities."""
    import optax
    from flax import nnx

    import gptoss_jax
    from gptoss_jax.lora import LoraConfig, add_lora
    from gptoss_jax.model import LoRAParam

    model = add_lora(gptoss_jax.GptOss(gptoss_jax.GptOssConfig.tiny(), dtype="float32", rngs=nnx.Rngs(4)),
                     LoraConfig(rank=4), rngs=nnx.Rngs(5))
    graphdef, master, frozen = nnx.split(model, LoRAParam, ...)
    master = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(6), a.shape), master)  # b != 0
    dtypes = jax.tree.map(lambda a: a.dtype, master)
    transform = optax.sgd(1.0)
    prompts = [[200006, 1428, 200008, 23, 45], [200006, 1428, 200008, 7]] * 2
    completions = [[11, 12, 13], [21, 22], [31], [41, 42, 43, 44, 45]]
    batch = {k: jnp.asarray(v) for k, v in grpo.completion_batch(prompts, completions, 12).items()}
    advantages = jnp.asarray([1.0, -0.5, 0.25, -2.0])
    settings = grpo.LossSettings(normalisation="sequence", beta=0.05)
    results = []
    for micro, pass_old in ((1, True), (2, True), (2, False)):
        steps = grpo.make_policy_steps(graphdef, dtypes, transform, settings, micro_batches=micro)
        old = steps.logprobs(master, frozen, batch) if pass_old else None
        ref = steps.logprobs(jax.tree.map(jnp.zeros_like, master), frozen, batch)
        new, _, metrics = steps.update(jax.tree.map(jnp.copy, master), transform.init(master), frozen, batch,
                                       old, ref, advantages)
        results.append((new, metrics))
    (whole, whole_metrics), *others = results
    for new, metrics in others:
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(new), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        for name in ("loss", "kl", "grad_norm"):
            np.testing.assert_allclose(metrics[name], whole_metrics[name], rtol=1e-5, err_msg=name)
    assert float(whole_metrics["grad_norm"]) > 0
