"""`Generator`: the simple batch API over the engine (`gptoss_jax.engine`). `generate` runs a batch of prompts
through an engine sized for it (the rows beyond its `slots`, if given, take the slots the finished rows free) and
returns each row's tokens. (A conversation that goes on after a tool's answer keeps its engine slot instead:
`gptoss_jax.agent`.)"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

from gptoss_jax import constrain
from gptoss_jax import tokenizer as tok
from gptoss_jax.engine import Engine, Request, compiled_steps
from gptoss_jax.model import GptOss, split_for_inference

# A completion ends when the assistant returns its final answer or calls a tool; `<|end|>` only ends one message.
DEFAULT_STOP_TOKENS = (tok.RETURN, tok.CALL)


class Generator:
    """Generation for one model; reuse it across calls (its engines share what it compiled). `state`: the
    parameters it runs (GRPO sets the ones being trained)."""

    def __init__(self, model: GptOss):
        self.model = model
        self.graphdef, self.state = split_for_inference(model)
        self.steps = compiled_steps(self.graphdef)

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
        slots: int | None = None,
    ) -> list[list[int]]:
        """New tokens of each prompt, up to `max_new_tokens` (one for all, or one per prompt) or through the first
        stop token (included). A row's tokens do not depend on the other rows.

        stop_tokens: None for harmony's (`<|return|>`, `<|call|>`); [] to never stop early.
        seed: one per prompt, or one for the batch (row i then draws with a seed made from it and i).
        stream(row, token) is called with every token as soon as it is sampled.
        cache_length: each row's cache capacity (default: the most a row needs, prompt and new tokens).
        constraints: per row, a grammar for the final answer and strict tools' arguments, and a reasoning budget
            (`gptoss_jax.constrain`); rows without one sample exactly as they would without it.
        slots: rows decoded at once (default: all); the others wait for a finished row's slot (continuous
            batching: a long row holds up no other).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        _check_settings(temperature, top_p, top_k)
        new = _per_row(max_new_tokens, len(prompts))
        needed = max(len(p) + n for p, n in zip(prompts, new, strict=True))
        capacity = cache_length or needed
        limit = self.model.config.max_position_embeddings
        if needed > min(capacity, limit):
            row = [len(p) + n for p, n in zip(prompts, new, strict=True)].index(needed)
            raise ValueError(f"prompt {row} needs {needed} positions with its new tokens ({len(prompts[row])} + "
                             f"{new[row]}); the cache holds {capacity} and the model {limit}")
        if slots is not None and slots < 1:
            raise ValueError(f"slots: at least 1, got {slots}")
        engine = Engine(self.model, slots=min(slots or len(prompts), len(prompts)), max_length=capacity,
                        split=(self.graphdef, self.state), steps=self.steps)
        states = constraints.states(prompts) if constraints is not None else [None] * len(prompts)
        requests = self._requests(prompts, new, seed, stop_tokens, stream, states, temperature=temperature,
                                  top_p=top_p, top_k=top_k)
        engine.run(requests)
        return [request.tokens for request in requests]

    def _requests(self, prompts, new, seed, stop_tokens, stream, states, **settings) -> list[Request]:
        if isinstance(seed, int):
            seeds = [seed] if len(prompts) == 1 else [zlib.crc32(f"{seed}:{row}".encode()) & 0x7FFFFFFF
                                                      for row in range(len(prompts))]
        elif len(seed) == len(prompts):
            seeds = list(seed)
        else:
            raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
        stops = tuple(DEFAULT_STOP_TOKENS if stop_tokens is None else stop_tokens)

        def on_token(row):
            return (lambda token, *_: stream(row, token)) if stream is not None else (lambda token, *_: None)

        return [Request(list(prompt), limit, seed=row_seed, stop_tokens=stops, on_token=on_token(row),
                        constraint=state, **settings)
                for row, (prompt, limit, row_seed, state) in enumerate(zip(prompts, new, seeds, states, strict=True))]


def _check_settings(temperature: float, top_p: float, top_k: int) -> None:
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")


def _per_row(max_new_tokens: int | Sequence[int], rows: int) -> list[int]:
    """Each row's new-token limit, from one for all or one per row."""
    new = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(new) != rows or min(new) < 0:
        raise ValueError(f"max_new_tokens: one count >= 0, or one per row ({rows}), got {max_new_tokens}")
    return new


def generate(model: GptOss, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
             stream: Callable[[int, int], None] | None = None,
             constraints: constrain.RowConstraints | None = None) -> list[list[int]]:
    """New tokens for a batch of prompts (token ids); see `Generator.generate`."""
    return Generator(model).generate(prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     seed=seed, stop_tokens=stop_tokens, stream=stream, constraints=constraints)
