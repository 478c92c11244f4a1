"""The language-model loss over a 201k vocabulary without [tokens, vocab] logits: log p(target) of every token a
chunk of tokens at a time, the counted tokens first and chunks of only uncounted ones skipped, with a custom VJP
that keeps one log-partition per token and recomputes each chunk's logits once for both gradients. Supervised
fine-tuning sums its cross-entropy (`token_losses`); GRPO scores its completions with it (`token_logprobs`).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


LOSS_CHUNK_BYTES = 2**27  # a chunk of the loss holds at most this much of float32 logits (128 MiB: 160 tokens of 201k)


def token_losses(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum over tokens of weight * cross-entropy, in float32 (see `token_logprobs`)."""
    return -jnp.sum(weights.reshape(-1) * token_logprobs(hidden, unembedding, targets, weights != 0).reshape(-1))


def token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, counted: jax.Array) -> jax.Array:
    """log p(target) of every token [..., T] (0 where not `counted`), computing the logits a chunk of tokens at a
    time (the full [tokens, vocab] logits of a long batch would not fit), in float32.

    The counted tokens are moved to the front first and chunks of only uncounted ones (the prompts, the padding)
    are skipped, forward and backward: with a 201k vocabulary the unembedding is a large part of a step, and most
    tokens of a fine-tuning batch are prompt."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, counted = targets.reshape(-1), counted.reshape(-1)
    order = jnp.argsort(~counted, stable=True)
    hidden, targets, counted = hidden[order], targets[order], counted[order]
    largest = 1 << max(6, (LOSS_CHUNK_BYTES // (4 * unembedding.shape[0])).bit_length() - 1)  # a power of two
    chunk = min(largest, max(64, len(targets) // 8))
    pad = -len(targets) % chunk

    def chunked(a):
        return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])

    logprobs = _chunked_logprobs(chunked(hidden), chunked(targets), chunked(counted), unembedding)
    return jnp.zeros(len(targets), jnp.float32).at[order].set(logprobs.reshape(-1)[:len(targets)]).reshape(shape)


def _chunk_logits(hidden, unembedding):
    return jnp.einsum("nd,vd->nv", hidden, unembedding, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _chunked_logprobs(hidden, targets, counted, unembedding):
    """logits[target] - logsumexp(logits) of chunks [C, n, ...] of tokens (0 in chunks with nothing counted). A
    custom VJP keeps only each token's log-partition for the backward, which recomputes a chunk's logits once for
    both gradients (nothing of size [tokens, vocab], and no per-chunk copy of the unembedding, is ever stored)."""
    return _logprobs_forward(hidden, targets, counted, unembedding)[0]


def _logprobs_forward(hidden, targets, counted, unembedding):
    def chunk_logprobs(chunk):
        h, t, c = chunk

        def compute(_):
            logits = _chunk_logits(h, unembedding)
            partition = jax.nn.logsumexp(logits, axis=-1)
            return jnp.where(c, jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - partition, 0.0), partition

        skipped = (jnp.zeros(t.shape, jnp.float32), jnp.zeros(t.shape, jnp.float32))
        return jax.lax.cond(jnp.any(c), compute, lambda _: skipped, None)

    with jax.named_scope("loss"):  # inside the custom VJP's rules: a scope around its call does not reach them
        return jax.lax.map(chunk_logprobs, (hidden, targets, counted))


def _logprobs_fwd(hidden, targets, counted, unembedding):
    # symbolic_zeros: arguments come as (value, perturbed); a frozen unembedding (LoRA) gets no gradient buffer.
    # Whether it trains travels in the residuals' structure: a marker array, or None.
    trains = jnp.zeros(()) if unembedding.perturbed else None
    hidden, targets, counted, unembedding = (p.value for p in (hidden, targets, counted, unembedding))
    logprobs, partitions = _logprobs_forward(hidden, targets, counted, unembedding)
    return logprobs, (hidden, targets, counted, unembedding, partitions, trains)


def _logprobs_bwd(residuals, grad):
    """Per chunk: d logits = grad * (one-hot target - softmax) on counted tokens; d hidden = d logits @ U; d U
    (only when the unembedding trains) accumulates d logits^T @ hidden."""
    hidden, targets, counted, unembedding, partitions, trains = residuals
    train_unembedding = trains is not None

    def chunk_grads(d_unembedding, chunk):
        h, t, c, partition, g = chunk

        def compute(d_unembedding):
            probs = jnp.exp(_chunk_logits(h, unembedding) - partition[:, None])
            d_logits = jnp.where(c, g, 0.0)[:, None] * (-probs).at[jnp.arange(len(t)), t].add(1.0)
            d_hidden = jnp.dot(d_logits.astype(h.dtype), unembedding, preferred_element_type=jnp.float32)
            if train_unembedding:
                d_unembedding += jnp.einsum("nv,nd->vd", d_logits.astype(h.dtype), h,
                                            preferred_element_type=jnp.float32)
            return d_unembedding, d_hidden.astype(h.dtype)

        return jax.lax.cond(jnp.any(c), compute, lambda d: (d, jnp.zeros_like(h)), d_unembedding)

    start = jnp.zeros(unembedding.shape, jnp.float32) if train_unembedding else None
    with jax.named_scope("loss"):
        d_unembedding, d_hidden = jax.lax.scan(chunk_grads, start, (hidden, targets, counted, partitions, grad))
    return (d_hidden, None, None,
            d_unembedding.astype(unembedding.dtype) if train_unembedding else None)


_chunked_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd, symbolic_zeros=True)
