"""The python tool against real kernels: notebook behaviour, and each sandbox threat ending as an error text within
the limits while this process carries on and the tool keeps working (or restarts) afterwards."""

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gptoss_jax.tools import PythonTool, SandboxUnavailable

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(wall_seconds=3, memory_mb=1024, max_processes=64, max_output_chars=2000)
BWRAP = shutil.which("bwrap")
# Only a machine where bubblewrap is missing or cannot make namespaces at all skips; any other failure to build
# the sandbox fails the tests.
NAMESPACES = BWRAP is not None and subprocess.run([BWRAP, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net",
                                                   "true"], capture_output=True).returncode == 0
needs_bwrap = pytest.mark.skipif(not NAMESPACES, reason="bubblewrap is not installed or cannot create namespaces "
                                                          "here (apt-get install bubblewrap)")


def _sandboxed(**limits) -> PythonTool:
    return PythonTool(**{**LIMITS, **limits})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def tool(scratch):
    """One sandboxed tool, shared by the tests that leave its kernel running."""
    tool = _sandboxed(scratch_dir=scratch)
    yield tool
    tool.close()


@needs_bwrap
def test_state_is_kept_across_calls(tool):
    assert tool.run("x = 21") == ""
    assert tool.run("x * 2") == "42"
    assert tool.run("print('hello', x)") == "hello 21"


@needs_bwrap
def test_an_error_comes_back_as_a_short_traceback_and_the_kernel_carries_on(tool):
    result = tool.run("def f():\n    return 1 / 0\nf()")
    assert "ZeroDivisionError: division by zero" in result and "\x1b[" not in result
    assert tool.run("1 + 1") == "2"


@needs_bwrap
def test_long_output_is_truncated_with_a_marker(tool):
    result = tool.run("print('a' * 3000 + 'b' * 3000, end='')")
    assert result == "a" * 1000 + "\n[... output truncated: 4000 of 6000 characters cut here ...]\n" + "b" * 1000


@needs_bwrap
def test_printing_until_the_wall_limit_keeps_only_head_and_tail(tool):
    result = tool.run("i = 0\nwhile True:\n    print(i, 'x' * 100)\n    i += 1")
    assert result.startswith("0 xxx") and "output truncated" in result and len(result) < 2500
    assert result.endswith("[Timed out after 3 seconds: the execution was interrupted; the kernel's state is kept.]")


@needs_bwrap
def test_an_infinite_loop_is_interrupted_at_the_wall_limit_and_the_state_kept(tool):
    tool.run("kept = 'still here'")
    start = time.monotonic()
    result = tool.run("while True:\n    pass")
    assert time.monotonic() - start < 6
    assert "KeyboardInterrupt" in result and "Timed out after 3 seconds" in result
    assert tool.run("kept") == "'still here'"


@needs_bwrap
def test_mnt_data_is_writable_and_persists_on_the_host(tool, scratch):
    assert tool.run("open('/mnt/data/note.txt', 'w').write('persisted')") == "9"
    assert tool.run("import os; os.getcwd(), open('note.txt').read()") == "('/mnt/data', 'persisted')"
    assert (scratch / "note.txt").read_text() == "persisted"


@needs_bwrap
def test_the_network_is_unreachable(tool):
    result = tool.run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
    assert "Network is unreachable" in result
    assert tool.run("'alive'") == "'alive'"


@needs_bwrap
@pytest.mark.parametrize("path", ["/usr/evil.txt", "/etc/evil.txt", str(ROOT / "evil.txt"), "/evil.txt"])
def test_nothing_outside_mnt_data_is_writable(tool, path):
    result = tool.run(f"open({path!r}, 'w')")
    assert any(error in result for error in ("Read-only file system", "Permission denied", "No such file")), result
    assert not Path(path).exists()


@needs_bwrap
def test_the_projects_files_and_the_hosts_secrets_are_not_visible(tool):
    assert (ROOT / "README.md").exists()
    result = tool.run(f"open({str(ROOT / 'README.md')!r}).read()")
    assert "FileNotFoundError" in result
    assert tool.run("import os; os.path.exists(os.path.expanduser('~/.ssh')), os.getuid() == 0") == "(False, False)"
    os.environ["GPTOSS_TEST_SECRET"] = "leaked"  # the kernel's environment is its own, not the host's
    try:
        assert tool.run("import os; os.environ.get('GPTOSS_TEST_SECRET')") == ""
    finally:
        del os.environ["GPTOSS_TEST_SECRET"]


@needs_bwrap
def test_allocating_past_the_memory_limit_raises_memory_error(tool):
    result = tool.run("block = bytearray(4 * 1024 * 2**20)")  # 4x the 1024 MB limit
    assert "MemoryError" in result
    assert tool.run("len(bytearray(100 * 2**20))") == "104857600"


@needs_bwrap
def test_a_fork_bomb_is_contained_and_the_kernel_restarted():
    with _sandboxed() as tool:
        tool.run("state = 1")
        start = time.monotonic()
        result = tool.run("import os\nwhile True:\n    os.fork()")
        assert time.monotonic() - start < 30
        assert "BlockingIOError" in result and "the kernel was restarted" in result
        assert "NameError" in tool.run("state")  # a fresh kernel
        assert tool.run("import os; len([p for p in os.listdir('/proc') if p.isdigit()])") == "2"  # init, kernel


@needs_bwrap
def test_a_kernel_that_dies_is_replaced():
    with _sandboxed() as tool:
        tool.run("state = 1")
        result = tool.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        assert "The python kernel died" in result and "state was lost" in result
        assert "NameError" in tool.run("state")
        assert tool.run("6 * 7") == "42"


@needs_bwrap
def test_the_cpu_time_limit_kills_a_spinning_kernel():
    with _sandboxed(cpu_seconds=2, wall_seconds=20) as tool:
        start = time.monotonic()
        result = tool.run("while True:\n    pass")
        assert time.monotonic() - start < 15
        assert "The python kernel died (past the CPU-time limit of 2 s?)" in result
        assert tool.run("6 * 7") == "42"


@needs_bwrap
def test_code_that_ignores_the_interrupt_gets_a_fresh_kernel():
    with _sandboxed(wall_seconds=2) as tool:
        result = tool.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
        assert "did not stop when interrupted: the kernel was restarted" in result
        assert tool.run("6 * 7") == "42"


def test_missing_bubblewrap_raises_sandbox_unavailable(monkeypatch, tmp_path):
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*--unsafe-python-tool"):
        PythonTool(bwrap=str(tmp_path / "bwrap"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="'bwrap' is not on PATH"):
        PythonTool()


def test_a_bubblewrap_that_cannot_run_raises_sandbox_unavailable(tmp_path):
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="could not start the python tool's sandbox.*No permissions"):
        PythonTool(bwrap=str(broken))


def test_unsafe_runs_without_the_sandbox_and_says_so(caplog, tmp_path):
    with caplog.at_level(logging.WARNING), PythonTool(unsafe=True, scratch_dir=tmp_path, wall_seconds=2) as tool:
        assert "WITHOUT a sandbox" in caplog.text
        assert tool.run("import os; os.getcwd()") == repr(str(tmp_path))
        assert "Timed out after 2 seconds" in tool.run("import time; time.sleep(10)")
