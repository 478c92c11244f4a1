"""The platform a computation is being compiled for, where the model chooses between paths (the Pallas kernels on a
GPU, workarounds for XLA's CPU backend on a CPU).

Normally that is jax's default backend. `gptoss_jax.gpu_compile` compiles for a GPU that is not here (jax's CUDA
plugin, deviceless, on a CPU host whose default backend stays "cpu"); it traces inside `compiling_for("gpu")`, so
every choice made while tracing is the one a GPU run makes.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_COMPILING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("gptoss_jax_compiling_for", default=None)


def platform() -> str:
    """"cpu", "gpu" or "tpu": what the computation being traced will run on."""
    return _COMPILING_FOR.get() or jax.default_backend()


def on_gpu() -> bool:
    return platform() == "gpu"


@contextlib.contextmanager
def compiling_for(platform_name: str):
    """Traces inside take `platform_name` for the platform they compile for."""
    token = _COMPILING_FOR.set(platform_name)
    try:
        yield
    finally:
        _COMPILING_FOR.reset(token)


def use_kernels(kernels: str) -> bool:
    """GptOssConfig.kernels: "pallas" always (interpret mode off a GPU), "auto" on a GPU, "xla" never."""
    return kernels == "pallas" or (kernels == "auto" and on_gpu())


def interpret_note() -> str:
    """What the log adds when a Pallas kernel runs off a GPU."""
    return "" if on_gpu() else " (interpret mode: no GPU)"
