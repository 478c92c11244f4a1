"""MXFP4 (OCP Microscaling, FP4 E2M1 elements) as gpt-oss checkpoints store their expert weights.

Every 32 consecutive values along a row share one E8M0 scale byte `s` (the power of two `2**(s - 127)`); each
value is a 4-bit E2M1 code, two per byte, the low nibble holding the even element. Codes map to
`FP4_VALUES`. A row of `n` values is therefore `n / 32` scale bytes and `n / 32` blocks of 16 bytes.

`Mxfp4Weight` is a weight matrix `[..., in, out]` (the layout the model multiplies with, `x @ w`) held the way
the checkpoints hold it: output-major, with the 32-value blocks running along `in`, the contraction axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 32  # values sharing one scale
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_SCALE_BIAS = 127  # E8M0: the byte s stands for 2**(s - 127)
_FP4_MAX_EXPONENT = 2  # 6 = 1.5 * 2**2, the largest E2M1 magnitude


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mxfp4Weight:
    """A weight `[..., in, out]` in MXFP4: `blocks` uint8 `[..., out, in/32, 16]`, `scales` uint8 `[..., out, in/32]`.

    A pytree: its leaves are the two uint8 arrays, so it stacks, slices, shards and checkpoints like any array pair.
    """

    blocks: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape `[..., in, out]`."""
        *leading, out, groups, _ = self.blocks.shape
        return (*leading, groups * BLOCK_SIZE, out)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.blocks.shape) + np.prod(self.scales.shape))

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        """The dense weight `[..., in, out]` (exact: every MXFP4 value is representable in bf16 and f32)."""
        return jnp.swapaxes(dequantize_rows(self.blocks, self.scales, dtype), -1, -2)

    def experts(self, index) -> Mxfp4Weight:
        """The weights at `index` of the leading (expert) axis."""
        return Mxfp4Weight(self.blocks[index], self.scales[index])

    def expert_rows(self, index: jax.Array, rows: jax.Array) -> Mxfp4Weight:
        """Output rows `rows` [R] of each expert `index` [P] (an `experts x rows` gather): blocks [P, R, in/32, 16]."""
        return Mxfp4Weight(self.blocks[index[:, None], rows], self.scales[index[:, None], rows])

    @classmethod
    def quantize(cls, weight: jax.Array) -> Mxfp4Weight:
        """Quantizes a dense `[..., in, out]` weight (see `quantize_rows`)."""
        return cls(*quantize_rows(jnp.swapaxes(jnp.asarray(weight), -1, -2)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mxfp4Layer:
    """Layer `layer` of a stack of MXFP4 expert weights `[layers, experts, ...]`, not sliced out of it.

    The model's layer loop hands packed expert weights to each layer this way: the experts' own loop then slices
    out just the experts it multiplies, where a layer sliced out first would be copied whole (XLA makes the
    operands of a loop into buffers) — a copy of every expert of the layer for a step that reads four.
    """

    stack: Mxfp4Weight
    layer: jax.Array  # int32 scalar

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    def experts(self, index) -> Mxfp4Weight:
        """The weights of expert(s) `index` of this layer."""
        return Mxfp4Weight(self.stack.blocks[self.layer, index], self.stack.scales[self.layer, index])

    def expert_rows(self, index: jax.Array, rows: jax.Array) -> Mxfp4Weight:
        """As `Mxfp4Weight.expert_rows`, read from the stack."""
        where = (self.layer, index[:, None], rows)
        return Mxfp4Weight(self.stack.blocks[where], self.stack.scales[where])

    def whole(self) -> Mxfp4Weight:
        """The layer sliced out (a copy)."""
        return Mxfp4Weight(self.stack.blocks[self.layer], self.stack.scales[self.layer])


@jax.custom_vjp
def fake_quantize(weight: jax.Array) -> jax.Array:
    """A dense `[..., in, out]` weight as its MXFP4 export holds it: quantized by `Mxfp4Weight.quantize` (the code
    `save_pretrained` writes with) and dequantized again, in `weight`'s dtype (exact: MXFP4 values are exact in
    bf16 and f32). The gradient passes straight through to `weight` (straight-through estimator), so training
    with it (quantization-aware training) moves the float weights the export rounds."""
    return Mxfp4Weight.quantize(weight).dequantize(jnp.float32).astype(weight.dtype)


def _fake_quantize_fwd(weight):
    return fake_quantize(weight), None


def _fake_quantize_bwd(_, grad):
    return (grad,)


fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def is_packed(weight) -> bool:
    return isinstance(weight, (Mxfp4Weight, Mxfp4Layer))


def dequantize_rows(blocks: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 blocks `[..., rows, n/32, 16]` and scales `[..., rows, n/32]` -> values `[..., rows, n]`.

    float32 and bfloat16 results are assembled bit by bit rather than computed, because XLA on CPU flushes
    subnormal results of arithmetic to zero, and the smallest scales make subnormals. Overflow gives ±inf, as in
    transformers.
    """
    blocks, scales = jnp.asarray(blocks), jnp.asarray(scales)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up")
    dtype = jnp.dtype(dtype)
    if dtype not in _BIT_LAYOUTS:
        return dequantize_rows(blocks, scales, jnp.float32).astype(dtype)
    bits_dtype, mantissa_bits = _BIT_LAYOUTS[dtype]
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*scales.shape, BLOCK_SIZE).astype(jnp.int32)
    sign, code_exponent, code_mantissa = codes >> 3, (codes >> 1) & 3, codes & 1
    # E2M1: 1.m * 2**(e - 1) for e > 0, and the one subnormal 0.5 = 1.0 * 2**-1. Both target formats have 8
    # exponent bits with bias 127, like the E8M0 scale.
    is_normal = code_exponent > 0
    mantissa = jnp.where(is_normal, code_mantissa, 0) << (mantissa_bits - 1)
    biased = jnp.where(is_normal, code_exponent - 1, -1) + scales.astype(jnp.int32)[..., None]
    subnormal = ((1 << mantissa_bits) | mantissa) >> jnp.clip(1 - biased, 0, 2)  # exact: at most 2 shifts
    magnitude = jnp.where(biased >= 1, (biased << mantissa_bits) | mantissa, subnormal)
    magnitude = jnp.where(biased >= 255, 255 << mantissa_bits, magnitude)  # infinity
    magnitude = jnp.where(codes & 7 == 0, 0, magnitude)
    bits = magnitude | (sign << (8 * jnp.dtype(bits_dtype).itemsize - 1))
    values = jax.lax.bitcast_convert_type(bits.astype(bits_dtype), dtype)
    return values.reshape(*scales.shape[:-1], -1)


_BIT_LAYOUTS = {jnp.dtype(jnp.float32): (jnp.uint32, 23), jnp.dtype(jnp.bfloat16): (jnp.uint16, 7)}


# Dequantized values `expert_products` holds at once (float32): a chunk of output rows that stays in a core's
# cache between being decoded and being multiplied.
PRODUCT_CHUNK_VALUES = 2**20


def expert_products(x: jax.Array, weight: Mxfp4Weight | Mxfp4Layer, index: jax.Array,
                    whole: bool = False) -> jax.Array:
    """x [P, in] times the weight [in, out] of expert `index[p]` of `weight` (experts on its leading axis) for
    each p: [P, out] in float32. What decoding needs — a few vectors, each against its own expert — without
    dequantizing the experts whole: a chunk of output rows at a time is decoded (at most PRODUCT_CHUNK_VALUES
    values) and multiplied, so no expert-sized float array is written to memory and read back (`whole`: one
    chunk, for a GPU, where a loop of small steps costs more than the memory).

    Each code becomes a float by moving its bits into a float16 (`_fp4_times_2_to_minus_14`) and each block's
    scale by moving its byte into a float32's exponent; every product equals `dequantize_rows`'s value times x
    except where that value is subnormal (flushed to zero, as a CPU's arithmetic flushes it anyway) or the scale
    passes 2**113 (infinite; checkpoints' scales are near 2**-5). Even and odd inputs meet the low and high nibbles
    of each byte, so the codes are never interleaved. The sums run in another order than over a dense weight:
    results agree to float32 rounding.
    """
    pairs, width = x.shape
    out = weight.shape[-1]
    x = x.astype(jnp.float32).reshape(pairs, width // 2, 2)
    even, odd = x[..., 0], x[..., 1]
    rows = out if whole else _chunk_rows(out, pairs * width)

    def chunk(first):
        part = weight.expert_rows(index, first + jnp.arange(rows))  # blocks [P, rows, in/32, 16]
        # 2**(s - 127) times the 2**14 the codes lack: the byte plus 14 as a float32 exponent
        scale = jax.lax.bitcast_convert_type(jnp.minimum(part.scales.astype(jnp.uint32) + 14, 255) << 23,
                                             jnp.float32)[..., None]
        low = (_fp4_times_2_to_minus_14(part.blocks & 0x0F) * scale).reshape(pairs, rows, -1)
        high = (_fp4_times_2_to_minus_14(part.blocks >> 4) * scale).reshape(pairs, rows, -1)
        return jnp.einsum("pi,pri->pr", even, low) + jnp.einsum("pi,pri->pr", odd, high)

    if rows == out:
        return chunk(0)
    return jnp.moveaxis(jax.lax.map(chunk, jnp.arange(0, out, rows)), 0, 1).reshape(pairs, out)


def _chunk_rows(out: int, values_per_row: int) -> int:
    """The largest divisor of `out` whose rows hold at most PRODUCT_CHUNK_VALUES values (at least one row)."""
    most = max(1, PRODUCT_CHUNK_VALUES // values_per_row)
    return max(rows for rows in range(1, min(out, most) + 1) if out % rows == 0)


def _fp4_times_2_to_minus_14(codes: jax.Array) -> jax.Array:
    """E2M1 codes (uint8, 0..15) -> their values times 2**-14, float32. A code's sign, two exponent bits and
    mantissa bit, moved to the top of a float16's sign and the low exponent and high mantissa bits, are the value
    times 2**-14 (float16's exponent bias 15 against E2M1's 1; the subnormal code 0.5 lands on float16's subnormal
    2**-15), and float16 -> float32 is exact: four integer operations and one conversion a value."""
    codes = codes.astype(jnp.uint16)
    bits = ((codes & 8) << 12) | ((codes & 7) << 9)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def quantize_rows(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """values `[..., rows, n]` -> (blocks, scales) by the OCP MX rules.

    Each block's scale is `2**(floor(log2(max |x|)) - 2)`, so its largest value lands in [4, 8) before rounding;
    values are rounded to the nearest E2M1 value, ties to the even code, and saturate at ±6. An all-zero block
    gets the smallest scale. Scales are clamped to the E8M0 range of finite powers of two, 2**-127 .. 2**127.
    """
    values = jnp.asarray(values, jnp.float32)
    *leading, n = values.shape
    if n % BLOCK_SIZE:
        raise ValueError(f"MXFP4 rows must be a multiple of {BLOCK_SIZE} values long, got {n}")
    values = values.reshape(*leading, n // BLOCK_SIZE, BLOCK_SIZE)
    largest = jnp.abs(values).max(axis=-1)
    _, exponent = jnp.frexp(largest)  # largest = mantissa * 2**exponent, mantissa in [0.5, 1)
    shared = jnp.where(largest > 0, exponent - 1 - _FP4_MAX_EXPONENT, -_SCALE_BIAS)
    shared = jnp.clip(shared, -_SCALE_BIAS, _SCALE_BIAS)
    magnitude = jnp.abs(jnp.ldexp(values, -shared[..., None]))
    # The E2M1 code of a magnitude is how many rounding boundaries it passes. A tie goes to the even code:
    # up (>=) from an odd code, down (>) from an even one.
    boundaries = [(0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)]
    codes = sum((magnitude >= b if tie_up else magnitude > b).astype(jnp.uint8) for b, tie_up in boundaries)
    codes = codes | (jnp.signbit(values).astype(jnp.uint8) << 3)
    pairs = codes.reshape(*codes.shape[:-1], BLOCK_SIZE // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (shared + _SCALE_BIAS).astype(jnp.uint8)
