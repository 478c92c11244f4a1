"""GRPO's arithmetic: group-normalised advantages and the clipped policy-gradient loss over sampled tokens.

For each prompt, G completions are sampled from the policy and scored; a completion's advantage is its reward
minus its group's mean, divided by the group's standard deviation (`scale = "group"`, GRPO), the batch's
(`"batch"`) or nothing (`"none"`, Dr. GRPO). The loss per sampled token t of completion i is

    -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t,   r = exp(logp - logp_old)

with KL_t the k3 estimator exp(ref - logp) - (ref - logp) - 1 of KL(policy || reference), and it is averaged as
the configured normalisation says: "sequence" (each completion's mean, then the mean over completions: GRPO's
paper), "token" (the mean over all sampled tokens of the batch: DAPO) or "dr_grpo" (the sum divided by
completions x max completion length: Dr. GRPO). eps_high > eps_low is DAPO's asymmetric clipping ("clip-higher").
These are TRL's GRPOTrainer definitions, so its users' settings mean the same here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

SCALES = ("group", "batch", "none")
NORMALISATIONS = ("sequence", "token", "dr_grpo")
STD_EPSILON = 1e-4  # added to the standard deviation, as TRL does: a group of equal rewards gets advantage 0


@dataclasses.dataclass(frozen=True)
class LossSettings:
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    beta: float = 0.0  # KL penalty weight; 0 skips the reference's forward pass
    normalisation: str = "sequence"
    max_completion_length: int = 0  # dr_grpo's constant denominator (tokens per completion)

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation: expected one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.normalisation == "dr_grpo" and self.max_completion_length < 1:
            raise ValueError("normalisation 'dr_grpo' needs max_completion_length")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ValueError(f"epsilon_low, epsilon_high and beta must be >= 0, got {self.epsilon_low}, "
                             f"{self.epsilon_high}, {self.beta}")


def group_advantages(rewards: jnp.ndarray, group_size: int, scale: str = "group") -> jnp.ndarray:
    """Advantages [N] of rewards [N] laid out prompt by prompt (each prompt's `group_size` completions together)."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    groups = rewards.reshape(-1, group_size)
    centred = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        return centred / (jnp.repeat(groups.std(axis=1, ddof=1), group_size) + STD_EPSILON)
    if scale == "batch":
        return centred / (rewards.std(ddof=1) + STD_EPSILON)
    return centred


def informative_groups(rewards: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """Per prompt, whether its completions' rewards differ (DAPO's dynamic sampling drops the groups that do
    not: their advantages are all zero and they only dilute the batch)."""
    groups = rewards.reshape(-1, group_size)
    return jnp.any(groups != groups[:, :1], axis=1)


def policy_loss(logprobs, old_logprobs, advantages, mask, settings: LossSettings, ref_logprobs=None):
    """(loss, metrics) of completions [N, T]: the policy's log-probabilities of the sampled tokens (what the
    gradient flows through), those of the policy that sampled them, the advantages [N], a mask [N, T] of the
    sampled tokens, and the reference's log-probabilities when beta > 0."""
    mask = mask.astype(logprobs.dtype)
    ratio = jnp.exp(logprobs - old_logprobs)
    advantage = advantages[:, None]
    clipped = jnp.clip(ratio, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    per_token = -jnp.minimum(ratio * advantage, clipped * advantage)
    metrics = {}
    if settings.beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference's log-probabilities")
        delta = ref_logprobs - logprobs
        kl = jnp.exp(delta) - delta - 1
        per_token = per_token + settings.beta * kl
        metrics["kl"] = _token_mean(kl, mask)
    if settings.normalisation == "sequence":
        loss = jnp.mean((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1))
    elif settings.normalisation == "token":
        loss = (per_token * mask).sum() / jnp.maximum(mask.sum(), 1)
    else:
        loss = (per_token * mask).sum() / (mask.shape[0] * settings.max_completion_length)
    low = (ratio < 1 - settings.epsilon_low) & (advantage < 0)  # the clip binds: no gradient through the ratio
    high = (ratio > 1 + settings.epsilon_high) & (advantage > 0)
    metrics.update(clip_low=_token_mean(low, mask), clip_high=_token_mean(high, mask),
                   clip_fraction=_token_mean(low | high, mask))
    return loss, metrics


def _token_mean(values, mask):
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1)


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     length: int) -> dict[str, np.ndarray]:
    """Each prompt followed by its completion, right-padded to `length`, as the training forward reads it:
    inputs, positions, segment_ids (1: the sequence, 0: padding), targets (the next token) and `counted`, the
    positions whose target is a sampled token — the loss is over those only."""
    rows = len(prompts)
    batch = {"inputs": np.zeros((rows, length), np.int32), "targets": np.zeros((rows, length), np.int32),
             "segment_ids": np.zeros((rows, length), np.int32), "counted": np.zeros((rows, length), bool),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        tokens = [*prompt, *completion]
        if len(tokens) > length or not prompt:
            raise ValueError(f"row {row}: a prompt of {len(prompt)} tokens and a completion of {len(completion)} "
                             f"do not fit {length} positions (or the prompt is empty)")
        batch["inputs"][row, :len(tokens)] = tokens
        batch["targets"][row, :len(tokens) - 1] = tokens[1:]
        batch["segment_ids"][row, :len(tokens)] = 1
        batch["counted"][row, len(prompt) - 1:len(tokens) - 1] = True
    return batch


def sequence_logprobs(model, batch, *, remat: str = "none"):
    """log p(token) of every sampled token [N, L] under `model` (0 elsewhere): the training forward."""
    from gptoss_jax.train.trainer import token_logprobs

    hidden, _ = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                    segment_ids=batch["segment_ids"], remat=remat)
    return token_logprobs(hidden, model.unembedding[...], batch["targets"], batch["counted"])


@dataclasses.dataclass
class PolicySteps:
    """The compiled steps of a GRPO update: the log-probabilities of sampled tokens under some parameters (the
    policy before the update, or the reference), and one optimizer update on the clipped objective."""

    logprobs: callable  # (master, frozen, batch) -> [N, L]
    update: callable  # (master, opt_state, frozen, batch, old, ref, advantages) -> (master, opt_state, metrics)


def make_policy_steps(graphdef, dtypes, transform, settings: LossSettings, *, remat: str = "none") -> PolicySteps:
    def logprobs(master, frozen, batch):
        params = jax.tree.map(lambda p, d: p.astype(d), master, dtypes)
        return sequence_logprobs(nnx.merge(graphdef, params, frozen), batch, remat=remat)

    def objective(master, frozen, batch, old, ref, advantages):
        return policy_loss(logprobs(master, frozen, batch), old, advantages, batch["counted"], settings,
                           ref_logprobs=ref)

    def update(master, opt_state, frozen, batch, old, ref, advantages):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(master, frozen, batch, old, ref,
                                                                             advantages)
        updates, opt_state = transform.update(grads, opt_state, master)
        return optax.apply_updates(master, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                                                                  **metrics}

    return PolicySteps(jax.jit(logprobs), jax.jit(update, donate_argnums=(0, 1)))
