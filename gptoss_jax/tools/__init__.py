"""The tools gpt-oss was trained to call (its built-in `browser` and `python`), for hosts that answer its calls."""

from gptoss_jax.tools.browser import BrowserError, BrowserTool
from gptoss_jax.tools.browser_backends import ExaBackend, LocalBackend, YouComBackend
from gptoss_jax.tools.browser_pages import Page, SearchResult
from gptoss_jax.tools.python import PythonTool, SandboxUnavailable

__all__ = [
    "BrowserError",
    "BrowserTool",
    "ExaBackend",
    "LocalBackend",
    "Page",
    "PythonTool",
    "SandboxUnavailable",
    "SearchResult",
    "YouComBackend",
]
