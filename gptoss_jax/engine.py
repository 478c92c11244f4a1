"""Continuous batching for the server: a fixed number of cache rows (slots), one decode step for all of them at
a time, and a finished request's slot refilled by the next request while the others keep decoding.

Requests admitted at the same step are prefilled together: their prompts left-padded to a power-of-two length
bucket and the rows to a power-of-two count (so few shapes compile), a prompt that several requests share (the n
choices of one chat request) prefilled once; each row is copied into its request's slot. Every step then decodes
all slots at once, each row at its own position, and samples each row with its own settings: temperature, top-k,
top-p, seed, and the OpenAI logit adjustments (presence / frequency penalties over the tokens the request has
generated, `logit_bias`), added to the logits before any of the others. A request may carry a constraint
(`gptoss_jax.constrain`, a structured output): its allowed next tokens are written into a bitmask on the host
while the device decodes, and the step's logits are masked only when some row is restricted. Under
`jax.distributed`, process 0 makes every decision and broadcasts it as a plan before each step; the other processes
run the same jitted steps on their shards (`Engine.follow`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import constrain, sharding
from gptoss_jax.generation import compiled_steps, placed_cache
from gptoss_jax.model import GptOss, KVCache

log = logging.getLogger(__name__)

MAX_STOP_TOKENS = 8
MAX_LOGIT_BIAS = 300  # tokens per request, as OpenAI allows
DEFAULT_CONTEXT = 8192  # tokens per request, prompt included, unless the model holds fewer


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time the token has been generated
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)  # token -> added to its logit
    logprobs: bool = False  # report each token's log probability (else on_token gets NaN: one less vocabulary pass)
    on_token: Callable[[int, float], None] = lambda token, logprob: None  # called on the engine thread
    on_done: Callable[[str], None] = lambda reason: None  # "stop", "length", "cancelled" or "error: ..."
    tokens: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False  # set by Engine.cancel: a request still queued is never admitted
    constraint: constrain.RowState | None = None  # a structured output (single-process servers)
    counts: dict[int, int] = dataclasses.field(default_factory=dict)  # generated tokens, for the penalties

    def adjustments(self) -> dict[int, float] | None:
        """What this request adds to the logits of the next step, by token (None: nothing)."""
        penalised = self.presence_penalty or self.frequency_penalty
        if not (penalised or self.logit_bias):
            return None
        added = dict(self.logit_bias)
        for token, count in self.counts.items() if penalised else ():
            added[token] = added.get(token, 0.0) - self.presence_penalty - self.frequency_penalty * count
        return added


class Engine:
    def __init__(self, model: GptOss, *, slots: int = 16, max_length: int | None = None, prefill_rows: int = 8):
        if max_length is None:
            max_length = min(DEFAULT_CONTEXT, model.config.max_position_embeddings)
        if max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's {model.config.max_position_embeddings}")
        self.model, self.slots, self.max_length = model, slots, max_length
        self.prefill_rows = prefill_rows  # prompts prefilled together at most: each needs a whole cache row too
        self.graphdef, self.state = nnx.split(model)
        self.cache = self._place(model.init_cache(jnp.zeros(slots, jnp.int32), max_length))
        self.active: dict[int, Request] = {}
        self.pending: queue.Queue[Request] = queue.Queue()
        self.cancelled: queue.Queue[Request] = queue.Queue()
        self.last_tokens = np.zeros(slots, np.int32)
        self.bitmask = constrain.allocate(slots, model.config.vocab_size)
        self.steps = np.zeros(slots, np.int32)
        self.settings = {"temperature": np.zeros(slots, np.float32), "top_p": np.ones(slots, np.float32),
                         "top_k": np.zeros(slots, np.int32), "seed": np.zeros(slots, np.int32)}
        self.template = _plan([], [], slots, max_length)
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

        @functools.partial(jax.jit, donate_argnums=0)
        def insert(cache, batch, rows, slots):
            return jax.tree.map(lambda whole, part: _set_rows(whole, part, rows, slots), cache, batch)

        self._prefill, self._decode = compiled_steps(self.graphdef)
        self._insert = insert
        self._sample = jax.jit(_sample_rows)
        self._mask = jax.jit(constrain.apply)
        self._argmax = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))
        # in float32: in bfloat16 a small penalty would vanish on exactly the large logits it is meant to lower
        self._adjust = jax.jit(lambda logits, tokens, added: logits.astype(jnp.float32).at[
            jnp.arange(logits.shape[0])[:, None], tokens].add(added))
        self._logprob = jax.jit(lambda logits, tokens: jnp.take_along_axis(
            jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tokens[:, None], axis=-1)[:, 0])

    # ---- what the HTTP side calls ----------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queues a request; its tokens arrive through `on_token`, the end through `on_done`."""
        if len(request.prompt) + request.max_tokens > self.max_length:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens and asks for up to {request.max_tokens} "
                             f"more, but this server's context holds {self.max_length} tokens")
        if len(request.stop_tokens) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens")
        if len(request.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens")
        if request.constraint is not None and jax.process_count() > 1:
            raise ValueError("structured outputs (response_format, strict tools) are served by single-process "
                             "servers only: the other processes would need every step's token masks")
        # The plan carries these as float32: every process must add exactly the same adjustments.
        request.presence_penalty = float(np.float32(request.presence_penalty))
        request.frequency_penalty = float(np.float32(request.frequency_penalty))
        request.logit_bias = {token: float(np.float32(bias)) for token, bias in request.logit_bias.items()}
        self.pending.put(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """Ends a request early (its client left, or its text hit a stop string); its slot frees at the next step."""
        request.cancelled = True
        self.cancelled.put(request)
        self._wake.set()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if jax.process_count() > 1:
            _exchange(None, self.template)  # releases the other processes' `follow`

    # ---- the loop (process 0) --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            cancelled = []
            while not self.cancelled.empty():
                request = self.cancelled.get()
                cancelled += [slot for slot, active in self.active.items() if active is request]
            admissions = []
            while len(self.active) - len(cancelled) + len(admissions) < self.slots and not self.pending.empty():
                request = self.pending.get()
                if request.cancelled:
                    request.on_done("cancelled")
                else:
                    admissions.append((self._free_slot(admissions, cancelled), request))
            if not (admissions or cancelled or self.active):
                self._wake.wait(0.05)
                self._wake.clear()
                if jax.process_count() > 1:  # a heartbeat: the other processes wait in a collective with a timeout
                    _exchange(_plan([], [], self.slots, self.max_length), self.template)
                continue
            try:
                if jax.process_count() > 1:
                    _exchange(_plan(admissions, cancelled, self.slots, self.max_length), self.template)
                self.step(admissions, cancelled)
            except Exception as error:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                for request in [*self.active.values(), *(r for _, r in admissions)]:
                    request.on_done(f"error: {error}")
                self.active.clear()

    def _free_slot(self, admissions, cancelled) -> int:
        taken = (set(self.active) - set(cancelled)) | {slot for slot, _ in admissions}
        return next(slot for slot in range(self.slots) if slot not in taken)

    def step(self, admissions: list[tuple[int, Request]], cancelled: list[int]) -> None:
        """Frees the cancelled slots, prefills the admitted requests into theirs (sampling their first tokens),
        then decodes every busy slot once."""
        for slot in cancelled:
            self.active.pop(slot).on_done("cancelled")
        buckets: dict[int, list[tuple[int, Request]]] = {}
        for slot, request in admissions:
            buckets.setdefault(self._bucket(request), []).append((slot, request))
        for bucket, admitted in buckets.items():
            prompts = list(dict.fromkeys(tuple(request.prompt) for _, request in admitted))
            for first in range(0, len(prompts), self.prefill_rows):  # the requests of prefill_rows prompts at a time
                chunk = set(prompts[first:first + self.prefill_rows])
                self._admit(bucket, [(slot, request) for slot, request in admitted if tuple(request.prompt) in chunk])
        if self.active:
            logits, self.cache = self._decode(self.state, self._replicated(self.last_tokens), self.cache)
            self.steps += 1
            self._deliver(logits, sorted(self.active))

    # ---- the other processes ------------------------------------------------------------------------------

    def follow(self) -> None:
        """Runs each plan process 0 broadcasts, until it stops the engine."""
        while (plan := _exchange(None, self.template)) is not None:
            admissions = [
                (int(slot), Request(prompt[prompt >= 0].tolist(), int(limit), float(t), float(p), int(k), int(s),
                                    tuple(int(x) for x in stops if x >= 0), float(presence), float(frequency),
                                    {int(x): float(v) for x, v in zip(biased, bias, strict=True) if x >= 0},
                                    bool(logprobs)))
                for slot, prompt, limit, t, p, k, s, stops, presence, frequency, biased, bias, logprobs in zip(
                    plan["slot"], plan["prompt"], plan["max_tokens"], plan["temperature"], plan["top_p"],
                    plan["top_k"], plan["seed"], plan["stop_tokens"], plan["presence_penalty"],
                    plan["frequency_penalty"], plan["bias_tokens"], plan["bias_values"], plan["logprobs"],
                    strict=True)
                if slot >= 0
            ]
            self.step(admissions, [int(slot) for slot in plan["cancelled"] if slot >= 0])

    # ---- the steps ------------------------------------------------------------------------------------------

    def _bucket(self, request: Request) -> int:
        """The length its prompt is left-padded to: a power of two (few prefill shapes), shrunk near the end of
        the context so that the new tokens, written after the padding, still fit in the cache."""
        room = self.max_length - request.max_tokens + 1  # the last new token is returned, never written
        return min(max(16, 1 << (len(request.prompt) - 1).bit_length()), room)

    def _admit(self, bucket: int, admitted: list[tuple[int, Request]]) -> None:
        """One prefill for requests whose prompts share a bucket: each distinct prompt once, the rows padded to a
        power of two with copies of the first; each request's row then copied into its slot."""
        prompts = list(dict.fromkeys(tuple(request.prompt) for _, request in admitted))
        rows = 1 << (len(prompts) - 1).bit_length()
        tokens, starts = np.zeros((rows, bucket), np.int32), np.zeros(rows, np.int32)
        for row in range(rows):
            prompt = prompts[row] if row < len(prompts) else prompts[0]
            tokens[row, bucket - len(prompt):], starts[row] = prompt, bucket - len(prompt)
        logits, batch = self._prefill(self.state, self._replicated(tokens),
                                      self._place(self.model.init_cache(jnp.asarray(starts), self.max_length)))
        source = [prompts.index(tuple(request.prompt)) for _, request in admitted]
        slots = [slot for slot, _ in admitted]
        padding = (1 << (len(admitted) - 1).bit_length()) - len(admitted)  # repeats of the first write: few shapes
        self.cache = self._insert(self.cache, batch, self._replicated(np.asarray(source + source[:1] * padding)),
                                  self._replicated(np.asarray(slots + slots[:1] * padding)))
        for slot, request in admitted:
            for name in self.settings:
                self.settings[name][slot] = getattr(request, name)
            self.steps[slot] = 0
            self.active[slot] = request
        self._deliver(logits[self._replicated(np.asarray(source, np.int32))], slots)

    def _deliver(self, logits: jax.Array, slots: list[int]) -> None:
        """Samples each slot's next token and hands it to its request; finished requests free their slot."""
        rows = np.asarray(slots, np.int32)
        if logits.shape[0] != len(slots):
            logits = logits[self._replicated(rows)]
        model_logits = logits  # logprobs are the model's, before any adjustment, penalty or mask
        added = [self.active[slot].adjustments() for slot in slots]
        if any(added):  # else no adjustment work at all
            width = 1 << (max(len(a or ()) for a in added) - 1).bit_length()
            tokens, values = np.zeros((len(slots), width), np.int32), np.zeros((len(slots), width), np.float32)
            for row, adjustment in enumerate(added):
                tokens[row, : len(adjustment or ())] = list(adjustment or ())
                values[row, : len(adjustment or ())] = list((adjustment or {}).values())
            logits = self._adjust(logits, self._replicated(tokens), self._replicated(values))
        if any(self.active[slot].constraint is not None for slot in slots):  # else no mask work at all
            restricted = [constrain.fill(self.active[slot].constraint, self.bitmask, slot) for slot in slots]
            if any(restricted):  # masks filled on the host while the device computes the logits
                logits = self._mask(logits, self._replicated(self.bitmask[rows]))
        if self.settings["temperature"][rows].any():
            settings = {name: self._replicated(values[rows]) for name, values in self.settings.items()}
            tokens = self._sample(logits, steps=self._replicated(self.steps[rows]), **settings)
        else:  # all greedy: no sorting of the vocabulary
            tokens = self._argmax(logits)
        if any(self.active[slot].logprobs for slot in slots):
            logprobs = _on_host(self._logprob(model_logits, tokens)).tolist()
        else:
            logprobs = [float("nan")] * len(slots)
        for slot, token, logprob in zip(slots, _on_host(tokens).tolist(), logprobs, strict=True):
            request = self.active[slot]
            self.last_tokens[slot] = token
            request.tokens.append(token)
            request.counts[token] = request.counts.get(token, 0) + 1
            request.on_token(token, logprob)
            if token in request.stop_tokens or len(request.tokens) >= request.max_tokens:
                del self.active[slot]
                request.on_done("stop" if token in request.stop_tokens else "length")
            elif request.constraint is not None:
                try:
                    request.constraint.advance(token)
                except constrain.ConstraintError as error:  # fails this request alone
                    del self.active[slot]
                    request.on_done(f"error: {error}")

    def _replicated(self, array: np.ndarray) -> jax.Array:
        mesh = self.model.mesh
        if mesh is None:
            return jnp.asarray(array)
        return sharding.put(np.asarray(array), NamedSharding(mesh, PartitionSpec()))

    def _place(self, cache: KVCache) -> KVCache:
        """On a mesh: key/value heads over tensor (the rows stay whole: slots are refilled one at a time)."""
        mesh = self.model.mesh
        return cache if mesh is None else placed_cache(cache, mesh, split_rows=False)


def _set_rows(whole: jax.Array, part: jax.Array, rows: jax.Array, slots: jax.Array) -> jax.Array:
    """Rows `rows` of a prefilled batch written to rows `slots` of a cache array: axis 1 of [layers, B, ...]
    tensors, axis 0 of start / length [B]."""
    if whole.ndim == 1:
        return whole.at[slots].set(part[rows])
    return whole.at[:, slots].set(part[:, rows])


def _sample_rows(logits, *, steps, temperature, top_p, top_k, seed):
    """`generation.sample` with each row's own settings, and its own key from (seed, step)."""

    def row(logits, step, temperature, top_p, top_k, seed):
        scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        ordered = jnp.sort(scaled)[::-1]
        scaled = jnp.where((top_k > 0) & (scaled < ordered[jnp.clip(top_k - 1, 0, scaled.shape[0] - 1)]),
                           -jnp.inf, scaled)
        ordered = jnp.sort(scaled)[::-1]
        probabilities = jax.nn.softmax(ordered)
        kept = jnp.sum(jnp.cumsum(probabilities) - probabilities < top_p)  # the smallest set reaching top_p
        scaled = jnp.where(scaled < ordered[kept - 1], -jnp.inf, scaled)
        drawn = jax.random.categorical(jax.random.fold_in(jax.random.key(seed), step), scaled)
        return jnp.where(temperature == 0, jnp.argmax(logits), drawn).astype(jnp.int32)

    return jax.vmap(row)(logits, steps, temperature, top_p, top_k, seed)


def _on_host(array: jax.Array) -> np.ndarray:
    return np.asarray(array if array.is_fully_addressable else array.addressable_data(0))


def _plan(admissions, cancelled, slots: int, max_length: int) -> dict[str, np.ndarray]:
    """This step's decisions as fixed-size arrays (-1: none), for the other processes."""
    plan = {"slot": np.full(slots, -1, np.int32), "prompt": np.full((slots, max_length), -1, np.int32),
            "max_tokens": np.zeros(slots, np.int32), "temperature": np.zeros(slots, np.float32),
            "top_p": np.ones(slots, np.float32), "top_k": np.zeros(slots, np.int32), "seed": np.zeros(slots, np.int32),
            "stop_tokens": np.full((slots, MAX_STOP_TOKENS), -1, np.int32),
            "presence_penalty": np.zeros(slots, np.float32), "frequency_penalty": np.zeros(slots, np.float32),
            "bias_tokens": np.full((slots, MAX_LOGIT_BIAS), -1, np.int32),
            "bias_values": np.zeros((slots, MAX_LOGIT_BIAS), np.float32), "logprobs": np.zeros(slots, np.int32),
            "cancelled": np.full(slots, -1, np.int32)}
    for index, (slot, request) in enumerate(admissions):
        plan["slot"][index] = slot
        plan["prompt"][index, : len(request.prompt)] = request.prompt
        plan["stop_tokens"][index, : len(request.stop_tokens)] = request.stop_tokens
        plan["bias_tokens"][index, : len(request.logit_bias)] = list(request.logit_bias)
        plan["bias_values"][index, : len(request.logit_bias)] = list(request.logit_bias.values())
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                     "logprobs"):
            plan[name][index] = getattr(request, name)
    plan["cancelled"][: len(cancelled)] = cancelled
    return plan


def _exchange(plan: dict | None, template: dict) -> dict | None:
    """Process 0's plan on every process (None: the engine stopped). The others pass None and receive arrays
    shaped like `template`."""
    from jax.experimental import multihost_utils

    if not int(multihost_utils.broadcast_one_to_all(np.int32(plan is not None))):
        return None
    received = multihost_utils.broadcast_one_to_all(plan if plan is not None else template)
    return {name: np.asarray(value) for name, value in received.items()}
