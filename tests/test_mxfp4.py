"""MXFP4: bit-exact with transformers' dequantizer, OCP MX rules for quantization, exact round trips."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_jax.mxfp4 import FP4_VALUES, Mxfp4Weight, dequantize_rows, quantize_rows

BITS = {jnp.float32: (np.uint32, torch.float32, torch.int32), jnp.bfloat16: (np.uint16, torch.bfloat16, torch.int16)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_is_bit_exact_with_transformers_on_random_bytes(dtype):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (5, 24, 3, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, (5, 24, 3), dtype=np.uint8)
    scales[0, 0] = [0, 1, 255]  # subnormal results and overflow to infinity
    bits, torch_dtype, torch_bits = BITS[dtype]
    expected = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch_dtype)
    actual = Mxfp4Weight(blocks, scales).dequantize(dtype)
    assert actual.shape == tuple(expected.shape) == (5, 96, 24)
    expected_bits = expected.contiguous().view(torch_bits).numpy().view(bits)
    np.testing.assert_array_equal(np.asarray(actual).view(bits), expected_bits)


def test_nibble_order_and_scale():
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, 0] = 0x7A  # low nibble 0xA = -1 (element 0), high nibble 0x7 = 6 (element 1)
    scales = np.array([[128]], np.uint8)  # 2**1
    values = np.asarray(dequantize_rows(blocks, scales))
    assert values.shape == (1, 32)
    assert values[0, :3].tolist() == [-2.0, 12.0, 0.0]


def _ocp_reference(values: np.ndarray) -> np.ndarray:
    """float64, value by value: scale 2**(floor(log2(amax)) - 2); the nearest E2M1 magnitude, ties to the even
    code; saturating at 6. Returns the dequantized result."""
    grid = np.abs(FP4_VALUES[:8]).astype(np.float64)
    out = np.zeros_like(values, np.float64)
    for row, block in np.ndindex(values.shape[0], values.shape[1] // 32):
        chunk = values[row, block * 32:(block + 1) * 32].astype(np.float64)
        amax = np.abs(chunk).max()
        scale = 2.0 ** min(max(math.floor(math.log2(amax)) - 2, -127), 127) if amax > 0 else 2.0**-127
        for i, x in enumerate(chunk):
            distance = np.abs(grid - min(abs(x) / scale, 6.0))
            nearest = [c for c in range(8) if distance[c] == distance.min()]
            code = nearest[0] if len(nearest) == 1 else next(c for c in nearest if c % 2 == 0)
            out[row, block * 32 + i] = math.copysign(grid[code] * scale, x)
    return out


def test_quantize_follows_the_ocp_rules_on_random_values():
    rng = np.random.default_rng(1)
    values = (rng.normal(size=(6, 64)) * np.exp(rng.normal(size=(6, 1)) * 4)).astype(np.float32)
    values[0, :32] = 0.0  # an all-zero block
    blocks, scales = quantize_rows(values)
    assert blocks.dtype == scales.dtype == jnp.uint8 and blocks.shape == (6, 2, 16) and scales.shape == (6, 2)
    np.testing.assert_array_equal(np.asarray(dequantize_rows(blocks, scales)), _ocp_reference(values))


def test_quantize_ties_go_to_the_even_code_and_large_values_saturate():
    # Scale 1 (the block's largest value is 7, floor(log2 7) = 2): magnitudes land on the grid directly.
    row = np.zeros(32, np.float32)
    row[:10] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -5.0]
    blocks, scales = quantize_rows(row[None])
    assert int(scales[0, 0]) == 127
    values = np.asarray(dequantize_rows(blocks, scales))[0, :10]
    np.testing.assert_array_equal(values, [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -4.0])


def test_round_trip_of_values_already_on_the_grid():
    """dequantize -> quantize -> dequantize gives back the same values (the bytes may differ: a block whose
    largest code is small is re-expressed with a smaller scale)."""
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (4, 16, 5, 16), dtype=np.uint8)
    scales = rng.integers(3, 250, (4, 16, 5), dtype=np.uint8)  # normal float32 results throughout
    weight = Mxfp4Weight(blocks, scales)
    values = weight.dequantize(jnp.float32)
    again = Mxfp4Weight.quantize(values)
    np.testing.assert_array_equal(np.asarray(again.dequantize(jnp.float32)), np.asarray(values))
    assert again.shape == weight.shape == (4, 160, 16)


def test_shapes_and_bytes():
    weight = Mxfp4Weight(np.zeros((7, 64, 3, 16), np.uint8), np.zeros((7, 64, 3), np.uint8))
    assert weight.shape == (7, 96, 64)
    assert weight.nbytes == 7 * 64 * 3 * 17
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(np.ones((2, 40)))


@pytest.mark.parametrize("chunk_values", [2**20, 2**10], ids=["whole", "chunked"])
@pytest.mark.parametrize("stacked", [False, True], ids=["weight", "layer of a stack"])
def test_expert_products_equal_the_dequantized_weights_product(chunk_values, stacked, monkeypatch):
    """Each vector times its own expert, decoded a few rows at a time, equals the product with the dequantized
    weights (in float64) to float32 rounding, over the whole range of normal results (scales 2**-124 .. 2**113),
    for weights and for a layer of a stack, in one chunk and in many."""
    import jax

    from gptoss_jax import mxfp4

    monkeypatch.setattr(mxfp4, "PRODUCT_CHUNK_VALUES", chunk_values)
    rng = np.random.default_rng(3)
    layers, experts, rows, width, pairs = 3, 6, 48, 320, 5
    blocks = rng.integers(0, 256, (layers, experts, rows, width // 32, 16), dtype=np.uint8)
    scales = rng.integers(3, 241, (layers, experts, rows, width // 32), dtype=np.uint8)
    index = rng.integers(0, experts, pairs).astype(np.int32)
    x = rng.normal(size=(pairs, width)).astype(np.float32)
    weight = (mxfp4.Mxfp4Layer(Mxfp4Weight(jnp.asarray(blocks), jnp.asarray(scales)), jnp.int32(1)) if stacked
              else Mxfp4Weight(jnp.asarray(blocks[1]), jnp.asarray(scales[1])))
    dense = np.asarray(dequantize_rows(blocks[1][index], scales[1][index]), np.float64)  # [pairs, rows, width]
    expected = np.einsum("pi,poi->po", x.astype(np.float64), dense)
    actual = np.asarray(jax.jit(mxfp4.expert_products)(jnp.asarray(x), weight, jnp.asarray(index)))
    assert actual.shape == (pairs, rows) and np.isfinite(expected).all()
    # each output sums 320 products of magnitudes up to 2**114: float32 rounding of the terms and their sums
    bound = 1e-5 * np.einsum("pi,poi->po", np.abs(x.astype(np.float64)), np.abs(dense))
    assert (np.abs(actual - expected) <= bound).all()


def test_expert_products_never_hold_an_expert_dequantized(monkeypatch):
    """The compiled product's temporaries stay near one chunk of decoded rows: far below the experts it reads,
    dequantized (what multiplying by `dequantize_rows` held)."""
    import jax

    from gptoss_jax import mxfp4

    monkeypatch.setattr(mxfp4, "PRODUCT_CHUNK_VALUES", 2**16)
    experts, rows, width, pairs = 8, 1024, 1024, 4
    weight = Mxfp4Weight(jnp.zeros((experts, rows, width // 32, 16), jnp.uint8),
                         jnp.zeros((experts, rows, width // 32), jnp.uint8))
    compiled = jax.jit(mxfp4.expert_products).lower(
        jnp.ones((pairs, width), jnp.float32), weight, jnp.arange(pairs, dtype=jnp.int32)).compile()
    dequantized = pairs * rows * width * 4  # 16 MiB
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries <= 2 * 2**16 * 4 < dequantized / 16, temporaries  # two chunks of float32
