"""Which Pallas lowering the kernels compile with on a GPU.

The kernels are generic Pallas — BlockSpecs, ref slices and jnp inside — so the same code runs in interpret mode
on a CPU (CI) and compiles on a GPU. On a GPU they ask for the Triton lowering. JAX 0.9+ defaults `pallas_call` to
Mosaic GPU, and 0.11 deprecates Triton; but Mosaic GPU kernels are written with its own primitives (TMA copies,
barriers, wgmma) that `interpret=True` cannot run, and its lowering of generic kernels does not cover the integer
bit work of MXFP4 decoding. Triton's lowering takes every kernel here (tests/test_gpu_compile.py compiles each for
an H100 on the CPU, through Triton and ptxas, without a GPU), so one source is tested here and compiled there.
"On a GPU" means the platform being compiled for (`gptoss_jax.backend`), which a deviceless compile sets.
Triton wants power-of-two blocks and matmul sides of at least 16, and no strided slices: the kernels use blocks of
16-256 (gpt-oss's 2880 is 45 blocks of 64), pad short inputs and small query groups to 16 rows, and split
SwiGLU's interleaved columns by a reshape.
"""

from __future__ import annotations

from gptoss_jax import backend


def compiler_params(interpret: bool):
    """`compiler_params` for `pl.pallas_call`: Triton's on a GPU, none in interpret mode or elsewhere."""
    if interpret or not backend.on_gpu():
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)
