"""Which Pallas lowering the kernels compile with on a GPU.

The kernels are generic Pallas — BlockSpecs, ref slices and jnp inside — so the same code runs in interpret mode
on a CPU (CI) and compiles on a GPU. On a GPU they ask for the Triton lowering. JAX 0.9+ defaults `pallas_call` to
Mosaic GPU, and 0.11 deprecates Triton; but Mosaic GPU kernels are written with its own primitives (TMA copies,
barriers, wgmma) that `interpret=True` cannot run, and its lowering of generic kernels does not cover the integer
bit work of MXFP4 decoding. Triton's lowering takes every kernel here (tests/test_kernels.py lowers each for CUDA
on the CPU; compiling the result to GPU code needs a GPU), so one source is tested here and compiled there.
Triton wants power-of-two blocks and matmul sides of at least 16, and no strided slices: the kernels use blocks of
16-256 (gpt-oss's 2880 is 45 blocks of 64), pad short inputs and small query groups to 16 rows, and split
SwiGLU's interleaved columns by a reshape.
"""

from __future__ import annotations

import jax


def compiler_params(interpret: bool):
    """`compiler_params` for `pl.pallas_call`: Triton's on a GPU, none in interpret mode or elsewhere."""
    if interpret or jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)
