"""Pallas kernels for gpt-oss (MXFP4 expert matmul, attention with sinks); installed as gptoss_jax.kernels."""
