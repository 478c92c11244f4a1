"""Batched generation with a KV cache: prefill the left-padded prompts once, then one jitted decode step per
token (the cache donated), sampling greedy / temperature / top-k / top-p, stopping on harmony stop tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import constrain, sharding
from gptoss_jax import tokenizer as tok
from gptoss_jax.model import GptOss, KVCache

# A completion ends when the assistant returns its final answer or calls a tool; `<|end|>` only ends one message.
DEFAULT_STOP_TOKENS = (tok.RETURN, tok.CALL)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float, top_k: int) -> jax.Array:
    """Next tokens [B] from logits [B, V]: argmax when temperature is 0, else a draw from the softmax of
    logits / temperature restricted to the `top_k` likeliest tokens (0: all) and to the smallest set whose
    probability reaches `top_p`. `key` is one key for the batch, or one per row ([B])."""
    if key.shape:  # one key per row
        return jax.vmap(lambda k, row: sample(row[None], k, temperature=temperature, top_p=top_p, top_k=top_k)[0]
                        )(key, logits)
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # the smallest prefix reaching top_p: keep tokens whose preceding mass is below it
        cutoff_rank = jnp.sum(cumulative - jax.nn.softmax(ordered, axis=-1) < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, cutoff_rank - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def compiled_steps(graphdef: nnx.GraphDef):
    """The jitted (prefill, decode) of a model split into `graphdef` and a state passed to each call; decode
    donates the cache it is given."""

    @jax.jit
    def prefill(state, tokens, cache):
        return nnx.merge(graphdef, state).prefill(tokens, cache)

    @functools.partial(jax.jit, donate_argnums=2)
    def decode(state, tokens, cache, live=None):
        return nnx.merge(graphdef, state).decode(tokens, cache, live)

    return prefill, decode


class Generator:
    """Compiled prefill and decode steps for one model; reuse it across calls to avoid recompiling."""

    def __init__(self, model: GptOss):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self._prefill, self._decode = compiled_steps(self.graphdef)
        self._draw = jax.jit(sample, static_argnames=("temperature", "top_p", "top_k"))
        self._extend = jax.jit(lambda state, tokens, count, cache: nnx.merge(self.graphdef, state).extend(
            tokens, count, cache), donate_argnums=3)
        self._sample_masked = jax.jit(lambda logits, key, bitmask, **settings: sample(
            constrain.apply(logits, bitmask), key, **settings), static_argnames=("temperature", "top_p", "top_k"))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] = 0,
        stop_tokens: Sequence[int] | None = None,
        stream: Callable[[int, int], None] | None = None,
        cache_length: int | None = None,
        constraints: constrain.RowConstraints | None = None,
        keep_cache: bool = False,
    ) -> list[list[int]] | tuple[list[list[int]], KVCache]:
        """New tokens of each prompt, up to `max_new_tokens` (one for all, or one per prompt) or through the first
        stop token (included).

        stop_tokens: None for harmony's (`<|return|>`, `<|call|>`); [] to never stop early.
        seed: one seed for the batch, or one per prompt (a row's draws then do not depend on the other rows).
        stream(row, token) is called with every token as soon as it is sampled.
        cache_length: the cache capacity (default: longest prompt + max_new_tokens).
        constraints: per row, a grammar for the final answer and strict tools' arguments, and a reasoning budget
            (`gptoss_jax.constrain`); rows without one sample exactly as they would without it.
        keep_cache: also return the cache, to `resume` the rows later (a finished row's cache holds its prompt and
            output up to its last token fed, `cache.length - cache.start` tokens).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        _check_settings(temperature, top_p, top_k)
        new = _per_row(max_new_tokens, len(prompts))
        stops = set(DEFAULT_STOP_TOKENS if stop_tokens is None else stop_tokens)
        longest = max(len(p) for p in prompts)
        needed = max(len(p) + n for p, n in zip(prompts, new, strict=True))  # indices: padded to the longest
        capacity = cache_length or longest + max(new)
        limit = self.model.config.max_position_embeddings
        if longest + max(new) > capacity or needed > limit:
            raise ValueError(f"the prompts need {needed} positions with their new tokens (a prompt of {longest} "
                             f"tokens plus up to {max(new)} new ones); the cache holds {capacity} and the model "
                             f"{limit}")
        self._check_tokens(prompts, "prompt")
        # A prompt asked several times (n samples, GRPO's groups) is prefilled once; its rows then share that cache.
        distinct: dict[tuple[int, ...], int] = {}
        source_row = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt in prompts]
        tokens = np.zeros((len(distinct), longest), np.int32)
        for row, prompt in enumerate(distinct):
            tokens[row, longest - len(prompt):] = prompt
        start = jnp.asarray([longest - len(p) for p in distinct], jnp.int32)
        cache = self._place_cache(self.model.init_cache(start, capacity))
        logits, cache = self._prefill(self.state, self._replicated(tokens), cache)
        if len(distinct) < len(prompts):
            logits, cache = self._spread(logits, cache, np.asarray(source_row, np.int32))
        states = constraints.states(prompts) if constraints is not None else None
        outputs, cache = self._sample(logits, cache, new, temperature=temperature, top_p=top_p,
                                      top_k=top_k, seed=seed, stops=stops, stream=stream, states=states)
        return (outputs, cache) if keep_cache else outputs

    def resume(self, cache: KVCache, appended: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | Sequence[int] = 0,
               stop_tokens: Sequence[int] | None = None,
               stream: Callable[[int, int], None] | None = None) -> tuple[list[list[int]], KVCache]:
        """Goes on generating for the rows of a kept cache (`generate(keep_cache=True)`, or an earlier `resume`)
        after appending `appended[row]` to each (at least one token: what the row's cache lacks of its sequence,
        e.g. its last output token, then a tool's answer): only the appended tokens are prefilled. Returns the
        new tokens of each row (as `generate`) and the cache."""
        if len(appended) != cache.start.shape[0] or any(len(a) == 0 for a in appended):
            raise ValueError(f"resume needs one non-empty chunk per cache row ({cache.start.shape[0]}), got "
                             f"{[len(a) for a in appended]}")
        _check_settings(temperature, top_p, top_k)
        self._check_tokens(appended, "appended chunk")
        new = _per_row(max_new_tokens, len(appended))
        # A row's positions count from its first real token; its cache indices also count its left padding.
        fed, written = self.fed(cache), _on_host(cache.length).tolist()
        positions = [f + len(a) + n for f, a, n in zip(fed, appended, new, strict=True)]
        limit = self.model.config.max_position_embeddings
        if max(positions) > limit:
            row = positions.index(max(positions))
            raise ValueError(f"row {row} needs {positions[row]} positions with its {fed[row]} tokens, "
                             f"{len(appended[row])} appended and {new[row]} new ones; the model holds {limit}")
        needed = max(w + len(a) + n for w, a, n in zip(written, appended, new, strict=True))
        if needed > cache.capacity:  # grown to a power of two (few shapes); decode attends over it all
            cache = self._grown(cache, 1 << (needed - 1).bit_length())
        width = 1 << (max(map(len, appended)) - 1).bit_length()  # few chunk shapes compile
        tokens = np.zeros((len(appended), width), np.int32)
        for row, chunk in enumerate(appended):
            tokens[row, : len(chunk)] = chunk
        count = np.asarray([len(a) for a in appended], np.int32)
        logits, cache = self._extend(self.state, self._replicated(tokens), self._replicated(count), cache)
        stops = set(DEFAULT_STOP_TOKENS if stop_tokens is None else stop_tokens)
        return self._sample(logits, cache, new, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stops=stops, stream=stream, states=None)

    def _grown(self, cache: KVCache, capacity: int) -> KVCache:
        """The cache with room for `capacity` indices. A banded ring shorter than the window was made as long as
        the cache (`init_cache`), so it holds index i in slot i, as the longer ring will: it is padded too."""

        def padded(array, size):
            return jnp.pad(array, ((0, 0), (0, 0), (0, 0), (0, size - array.shape[KVCache.SLOTS]), (0, 0)))

        window = min(self.model.config.sliding_window, capacity)
        cache = KVCache(*(padded(a, window) for a in (cache.banded_k, cache.banded_v)),
                        *(padded(a, capacity) for a in (cache.full_k, cache.full_v)), cache.start, cache.length)
        if self.model.mesh is not None:
            cache = jax.device_put(cache, cache_shardings(cache, self.model.mesh))
        return cache

    @staticmethod
    def fed(cache: KVCache) -> list[int]:
        """How many tokens of each row's sequence its cache holds (prompt and output, the last output token aside
        when generation stopped there)."""
        return _on_host(cache.length - cache.start).tolist()

    def take_rows(self, cache: KVCache, rows: Sequence[int]) -> KVCache:
        """The cache of some of its rows, in that order (the conversations that go on)."""
        return self._spread(jnp.zeros((cache.start.shape[0], 1)), cache, np.asarray(rows, np.int32))[1]

    def _check_tokens(self, chunks: Sequence[Sequence[int]], what: str) -> None:
        vocab = self.model.config.vocab_size
        for row, chunk in enumerate(chunks):
            if min(chunk) < 0 or max(chunk) >= vocab:
                raise ValueError(f"{what} {row}: token ids must be in [0, {vocab}), got {min(chunk)}..{max(chunk)}")

    def _sample(self, logits, cache, new, *, temperature, top_p, top_k, seed, stops, stream, states):
        """The sampling loop from the logits after each row's last token, up to `new[row]` tokens a row; finished
        rows are no longer written."""
        rows = logits.shape[0]
        if isinstance(seed, int):
            key, fold = jax.random.key(seed), jax.random.fold_in
        elif len(seed) == rows:
            key, fold = jax.vmap(jax.random.key)(jnp.asarray(seed, jnp.uint32)), jax.vmap(jax.random.fold_in, (0, None))
        else:
            raise ValueError(f"{len(seed)} seeds for {rows} prompts")
        outputs = [[] for _ in range(rows)]
        done = np.asarray(new) == 0
        bitmask = constrain.allocate(rows, self.model.config.vocab_size) if states is not None else None
        masked = self._fill(states, done, bitmask)
        settings = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        for step in range(max(new)):
            if masked:
                chosen = self._sample_masked(logits, fold(key, step), self._replicated(bitmask), **settings)
            else:
                chosen = self._draw(logits, fold(key, step), **settings)
            chosen = _on_host(chosen)
            for row, token in enumerate(chosen.tolist()):
                if not done[row]:
                    outputs[row].append(token)
                    done[row] = token in stops or len(outputs[row]) == new[row]
                    if stream is not None:
                        stream(row, token)
            if done.all():
                break
            logits, cache = self._decode(self.state, self._replicated(chosen), cache, self._replicated(~done))
            if states is not None:  # the next masks, on the host while the device decodes
                for row, token in enumerate(chosen.tolist()):
                    if not done[row]:
                        states[row].advance(token)
                masked = self._fill(states, done, bitmask)
        return outputs, cache

    def _spread(self, logits: jax.Array, cache: KVCache, source_row: np.ndarray) -> tuple[jax.Array, KVCache]:
        """The prefilled rows copied out to the rows that asked for them (row i gets row `source_row[i]`), placed
        as a cache of that many rows is."""
        logits, cache = _spread_rows(logits, cache, self._replicated(source_row))
        if self.model.mesh is not None:
            cache = jax.device_put(cache, cache_shardings(cache, self.model.mesh))
        return logits, cache

    @staticmethod
    def _fill(states, done, bitmask) -> bool:
        """Each constrained row's allowed next tokens into `bitmask`; whether any row is restricted."""
        if states is None:
            return False
        return any([constrain.fill(None if done[row] else state, bitmask, row) for row, state in enumerate(states)])

    def _replicated(self, array: np.ndarray):
        """Host values as every device's copy (the same value on every host, as jax.distributed requires)."""
        mesh = self.model.mesh
        return array if mesh is None else sharding.put(np.asarray(array), NamedSharding(mesh, PartitionSpec()))

    def _place_cache(self, cache: KVCache) -> KVCache:
        return cache if self.model.mesh is None else placed_cache(cache, self.model.mesh)


@jax.jit
def _spread_rows(logits: jax.Array, cache: KVCache, index: jax.Array) -> tuple[jax.Array, KVCache]:
    return logits[index], KVCache(*(a[:, index] for a in (cache.banded_k, cache.banded_v, cache.full_k, cache.full_v)),
                                  cache.start[index], cache.length[index])


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh, split_rows: bool = True) -> KVCache:
    """Where a cache lives beside the parameters: rows over data x fsdp (unless `split_rows` is off), key/value
    heads over tensor, where they split."""
    rows = sharding.batch_spec(cache.start.shape[0], mesh) if split_rows else PartitionSpec()
    heads = "tensor" if cache.full_k.shape[2] % mesh.shape["tensor"] == 0 else None
    layers = NamedSharding(mesh, PartitionSpec(None, *(rows or (None,)), heads, None, None))
    return KVCache(layers, layers, layers, layers, NamedSharding(mesh, rows), NamedSharding(mesh, rows))


def placed_cache(cache: KVCache, mesh: jax.sharding.Mesh, split_rows: bool = True) -> KVCache:
    """An empty cache made where `cache_shardings` puts it (every process making its own shards)."""
    where = cache_shardings(cache, mesh, split_rows)
    keys_values = {name: sharding.zeros(getattr(cache, name).shape, getattr(cache, name).dtype, getattr(where, name))
                   for name in ("banded_k", "banded_v", "full_k", "full_v")}
    return KVCache(**keys_values, start=sharding.put(np.asarray(cache.start), where.start),
                   length=sharding.put(np.asarray(cache.length), where.length))


def _check_settings(temperature: float, top_p: float, top_k: int) -> None:
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")


def _per_row(max_new_tokens: int | Sequence[int], rows: int) -> list[int]:
    """Each row's new-token limit, from one for all or one per row."""
    new = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(new) != rows or min(new) < 0:
        raise ValueError(f"max_new_tokens: one count >= 0, or one per row ({rows}), got {max_new_tokens}")
    return new


def _on_host(array: jax.Array) -> np.ndarray:
    """A replicated array's value; with several processes, this process's copy."""
    return np.asarray(array if array.is_fully_addressable else array.addressable_data(0))


def generate(model: GptOss, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
             stream: Callable[[int, int], None] | None = None,
             constraints: constrain.RowConstraints | None = None) -> list[list[int]]:
    """New tokens for a batch of prompts (token ids); see `Generator.generate`."""
    return Generator(model).generate(prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     seed=seed, stop_tokens=stop_tokens, stream=stream, constraints=constraints)
