"""The tools gpt-oss was trained to call."""

from gptoss_jax.tools.python import PythonTool, SandboxUnavailable

__all__ = ["PythonTool", "SandboxUnavailable"]
