"""Structured outputs: grammar-constrained decoding of the final answer and of strict tool-call arguments.

The analysis and commentary channels and the harmony headers are never constrained; a row's constraint starts
after its `<|channel|>final ...<|message|>` (or after the header of a call to a strict function,
`to=functions.NAME ... <|message|>`, whether or not the model wrote `<|constrain|>json`) and, once the grammar is
complete, only the message's stop token (`<|return|>` or `<|call|>`) is allowed. Grammars are compiled and
matched by llguidance (a maintained engine made for LLM decoding: JSON Schema with bounds, patterns and $ref,
regular expressions, Lark grammars; it refuses what it does not support rather than ignoring it).
Masks are computed on the host, one bit per token, and applied inside the jitted sampling.

A reasoning budget caps a row's analysis: when it is spent, the sampler closes the analysis and opens the final
channel itself (`<|end|><|start|>assistant<|channel|>final<|message|>`). An analysis message addressed to a tool
(python's code, a browser query) is a call, not reasoning: it neither counts nor is cut.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok

KINDS = ("json", "json_schema", "regex", "grammar")
_JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no runaway whitespace from a weak model


class ConstraintError(ValueError):
    """A schema, expression or grammar the engine cannot compile; the message says why."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity although the spec is a dict
class Constraint:
    """What a final answer must match. kind: json (any JSON object) | json_schema (spec: the schema, a dict) |
    regex (spec: a regular expression the whole answer matches) | grammar (spec: a Lark grammar)."""

    kind: str
    spec: Any = None

    def __post_init__(self):
        compiled(self)  # refuse a bad constraint when it is made, before anything is generated


def for_response_format(value: Any, where: str = "response_format") -> Constraint | None:
    """The constraint of an OpenAI response format: none for `text`, any JSON object for `json_object`, the schema
    for `json_schema` (whether or not it says `strict`: asking for a format is asking for it to hold)."""
    if isinstance(value, Mapping) and value.get("type") == "json_object":
        return Constraint("json")
    schema_format = harmony.response_format(value, where)
    if schema_format is None:
        return None
    try:
        return Constraint("json_schema", schema_format["schema"])
    except ConstraintError as error:
        raise ConstraintError(f"{where}.json_schema.schema: {error}") from None


def strict_tools(tools: Sequence[Any], where: str = "tools") -> dict[str, Constraint]:
    """The argument constraints of the function tools marked `strict: true`, by function name."""
    constraints = {}
    for index, tool in enumerate(tools):
        function = harmony.function_tool(index, tool)
        if function["strict"]:
            parameters = function["parameters"] or {"type": "object", "properties": {}, "additionalProperties": False}
            try:
                constraints[function["name"]] = Constraint("json_schema", parameters)
            except ConstraintError as error:
                raise ConstraintError(f"{where}[{index}].function.parameters: {error}") from None
    return constraints


@functools.cache
def matcher_tokenizer() -> llguidance.LLTokenizer:
    """The o200k_harmony vocabulary as llguidance reads it (built once: about a second)."""
    encoding = tok.get_encoding()
    names = {}
    for name, token in encoding._special_tokens.items():
        names.setdefault(token, name)  # o200k_harmony gives one id two names; the engine wants one
    return llguidance.LLTokenizer.from_tiktoken(
        encoder=encoding._mergeable_ranks, special_tokens={name: token for token, name in names.items()},
        pattern=encoding._pat_str, eos_token=[tok.RETURN, tok.CALL], n_vocab=encoding.n_vocab)


def compiled(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint, checked against the vocabulary."""
    return _compiled(constraint.kind, json.dumps(constraint.spec))  # key order kept: it is the answer's order


@functools.lru_cache(maxsize=256)
def _compiled(kind: str, spec_json: str) -> str:
    spec = json.loads(spec_json)
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        elif kind == "json_schema":
            if not isinstance(spec, dict):
                raise ConstraintError(f"a json_schema constraint needs the schema as an object, got {spec!r}")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(str(spec))
        elif kind == "grammar":
            grammar = llguidance.LLMatcher.grammar_from_lark(str(spec))
        else:
            raise ConstraintError(f"constraint kind {kind!r}: expected one of {', '.join(KINDS)}")
    except (ValueError, TypeError) as error:
        if isinstance(error, ConstraintError):
            raise
        raise ConstraintError(f"{kind}: {error}") from error
    problem = llguidance.LLMatcher.validate_grammar(grammar, matcher_tokenizer())
    if problem:
        raise ConstraintError(f"{kind}: {problem}")
    return grammar


@functools.cache
def final_opening() -> tuple[int, ...]:
    """The tokens that close an analysis and open the final channel."""
    encode = tok.get_encoding().encode_ordinary
    return (tok.END, tok.START, *encode("assistant"), tok.CHANNEL, *encode("final"), tok.MESSAGE)


class RowState:
    """One row's place in the harmony output: whether it is in a header or in which channel's message, the
    matcher of a constrained span, and the tokens the sampler must write next (a reasoning budget's closing)."""

    def __init__(self, final: Constraint | None, strict_tools: dict[str, Constraint], reasoning_budget: int | None):
        self.final, self.strict_tools, self.budget = final, strict_tools, reasoning_budget
        self.header: list[int] = []  # the current message's header tokens, until <|message|>
        self.in_header = True  # a completion starts inside the assistant's header
        self.channel: str | None = None  # the open message's channel; None between messages
        self.after_analysis = False  # the last message closed was an analysis
        self.matcher: llguidance.LLMatcher | None = None
        self.stop_token = tok.RETURN
        self.analysis_tokens = 0
        self.calling = False  # the open message is addressed to a tool
        self.forced: list[int] = []

    @property
    def active(self) -> bool:
        """Whether this row's next token is restricted at all."""
        return bool(self.forced) or self.matcher is not None or self._budget_spent()

    def _budget_spent(self) -> bool:
        """The analysis has used its budget and the row is still in it, or has just closed it."""
        if self.budget is None or self.in_header or self.analysis_tokens < self.budget:
            return False
        return (self.channel == "analysis" and not self.calling) or (self.channel is None and self.after_analysis)

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens of this row into bitmask[row] (all tokens when it is free)."""
        if self._budget_spent() and not self.forced:
            opening = final_opening()  # <|end|> first unless the model has just written it
            self.forced = list(opening if self.channel == "analysis" else opening[1:])
        if self.forced:
            _only(bitmask, row, self.forced[0])
        elif self.matcher is not None:
            if self.matcher.is_stopped():
                _only(bitmask, row, self.stop_token)
            else:
                llg_numpy.fill_next_token_bitmask(self.matcher, bitmask, row)
                other_stop = tok.CALL if self.stop_token == tok.RETURN else tok.RETURN  # each message its own
                bitmask.view(np.uint32)[row, other_stop // 32] &= ~np.uint32(1 << (other_stop % 32))
        else:
            bitmask[row] = -1

    def advance(self, token: int) -> None:
        """Take the token the row produced."""
        if self.forced:
            self.forced.pop(0)
        if self.matcher is not None:
            if token == self.stop_token:
                self.matcher, self.channel, self.after_analysis = None, None, False
            elif not self.matcher.consume_token(token):
                raise ConstraintError(f"token {token} left the grammar: {self.matcher.get_error()}")
            return
        if token == tok.START:
            self.in_header, self.header, self.channel = True, [], None
        elif self.in_header:
            if token == tok.MESSAGE:
                self._open_message()
            else:
                self.header.append(token)
        elif token in (tok.END, tok.RETURN, tok.CALL):
            self.after_analysis, self.channel = self.channel == "analysis" and not self.calling, None
        elif self.channel == "analysis" and not self.calling:
            self.analysis_tokens += 1

    def _open_message(self) -> None:
        """Read the header as the harmony parser does; a final, or a call to a strict function, is constrained."""
        self.in_header = False
        header = harmony.parse_header(self.header, None)
        if isinstance(header, str):  # a malformed header: the parser reports it; nothing to hold to a grammar
            self.channel = ""
            return
        self.channel = header.channel or ""
        # a call to a tool (python's code, a browser query) is not reasoning text: it neither counts against the
        # budget nor is cut by it
        self.calling = header.recipient is not None
        constraint = None
        if header.channel == "final" and header.recipient is None:
            constraint, self.stop_token = self.final, tok.RETURN
        elif (header.recipient or "").startswith("functions."):
            constraint = self.strict_tools.get(header.recipient.removeprefix("functions."))
            self.stop_token = tok.CALL
        if constraint is not None:
            self.matcher = llguidance.LLMatcher(matcher_tokenizer(), compiled(constraint))


def _only(bitmask: np.ndarray, row: int, token: int) -> None:
    bitmask[row] = 0
    bitmask.view(np.uint32)[row, token // 32] = np.uint32(1 << (token % 32))


@dataclasses.dataclass
class RowConstraints:
    """A generation's constraints: per row, the final answer's constraint, the strict functions' argument
    constraints by name, and the analysis budget (None: unlimited)."""

    final: Sequence[Constraint | None]
    strict_tools: Sequence[dict[str, Constraint]] | None = None
    reasoning_budget: Sequence[int | None] | None = None

    def states(self, prompts: Sequence[Sequence[int]]) -> list[RowState]:
        """Each row's state at the end of its prompt (`start`)."""
        rows = len(self.final)
        tools = self.strict_tools or [{}] * rows
        budgets = self.reasoning_budget or [None] * rows
        if len(tools) != rows or len(budgets) != rows:
            raise ValueError(f"constraints for {rows} rows, strict tools for {len(tools)}, budgets for "
                             f"{len(budgets)}")
        if len(prompts) != rows:
            raise ValueError(f"constraints for {rows} rows, {len(prompts)} prompts")
        return [start(p, f, t, b) for p, f, t, b in zip(prompts, self.final, tools, budgets, strict=True)]


def start(prompt: Sequence[int], final: Constraint | None, strict_tools: dict[str, Constraint] | None = None,
          reasoning_budget: int | None = None) -> RowState:
    """A row's state at the end of its prompt, which may already open a message (`...<|start|>assistant
    <|channel|>analysis<|message|>` starts the row inside its analysis)."""
    state = RowState(final, strict_tools or {}, reasoning_budget)
    last_start = max((i for i, token in enumerate(prompt) if token == tok.START), default=len(prompt))
    for token in prompt[last_start + 1:]:
        state.advance(token)
    return state


def describe(state: RowState) -> bytes:
    """A fresh state's constraints as JSON, for `restart` on another process (a multi-process server's plan)."""

    def one(constraint):
        return None if constraint is None else [constraint.kind, constraint.spec]

    return json.dumps({"final": one(state.final), "reasoning_budget": state.budget,
                       "strict_tools": {name: one(c) for name, c in state.strict_tools.items()}}).encode()


def restart(prompt: Sequence[int], description: bytes) -> RowState:
    """The state `describe` described, started at the end of `prompt`. As `start` reads only what follows the
    prompt's last `<|start|>`, a prompt that holds one (every request the server makes: a whole prompt, or a tool
    turn's chunk ending in `<|start|>assistant`) starts where the whole sequence does."""
    described = json.loads(description)

    def one(value):
        return None if value is None else Constraint(*value)

    return start(prompt, one(described["final"]), {name: one(v) for name, v in described["strict_tools"].items()},
                 described["reasoning_budget"])


def allocate(rows: int, vocab: int) -> np.ndarray:
    """An all-allowed bitmask [rows, ceil(vocab / 32)] int32."""
    bitmask = llg_numpy.allocate_token_bitmask(rows, vocab)
    bitmask[:] = -1
    return bitmask


def fill(state: RowState | None, bitmask: np.ndarray, row: int) -> bool:
    """Writes a row's allowed next tokens into bitmask[row] (all, for a row without a state or a free step);
    whether any token is ruled out."""
    if state is None or not state.active:
        bitmask[row] = -1
        return False
    state.fill(bitmask, row)
    return True


def apply(logits, bitmask):
    """Logits [B, V] with the tokens whose bit is 0 set to -inf (inside jit)."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :logits.shape[-1]].astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)
