"""The python tool against real kernels: notebook behaviour, and each sandbox threat ending as an error text within
the limits while this process carries on and the tool keeps working (or restarts) afterwards."""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
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


def _resident_bytes() -> int:
    """This process's resident memory."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


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
@pytest.mark.parametrize("path", ["/usr/evil.txt", "/etc/evil.txt", str(ROOT / "evil.txt"), "/evil.txt",
                                  "/dev/evil.txt", "/mnt/evil.txt", "/proc/evil.txt"])
def test_nothing_outside_mnt_data_is_writable(tool, path):
    result = tool.run(f"open({path!r}, 'w')")
    assert not Path(path).exists()  # nothing reaches the host
    if path.startswith("/tmp/"):  # a checkout under /tmp (CI's): inside, that is the sandbox's own capped /tmp
        return
    assert any(error in result for error in ("Read-only file system", "Permission denied", "No such file")), result


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
def test_no_process_in_the_sandbox_holds_the_hosts_environment():
    """Every /proc/*/environ the code can read (bwrap's own helper is process 1 there, running as the caller when
    that is not root) holds none of the host's variables."""
    os.environ["GPTOSS_TEST_SECRET"] = "leaked"
    try:
        with _sandboxed() as tool:
            result = tool.run("import glob\nfound = {}\nfor path in glob.glob('/proc/[0-9]*/environ'):\n"
                              "    try:\n        found[path] = open(path, 'rb').read()\n"
                              "    except OSError:\n        pass\n"
                              "print(len(found), any(b'GPTOSS_TEST_SECRET' in text for text in found.values()))")
    finally:
        del os.environ["GPTOSS_TEST_SECRET"]
    readable, leaked = result.split()
    assert int(readable) >= 1 and leaked == "False", result


@needs_bwrap
def test_tmp_and_dev_shm_share_one_capped_filesystem(tool):
    """/tmp is the only writable place besides /mnt/data; /dev/shm (POSIX shared memory, multiprocessing's
    semaphores) lies inside it, so neither can take the host's memory past the cap."""
    result = tool.run("import multiprocessing, os\nmultiprocessing.Lock()\n"
                      "s = os.statvfs('/tmp'); print(s.f_blocks * s.f_frsize // 2**20, os.path.realpath('/dev/shm'))")
    assert result == "256 /tmp", result
    result = tool.run("with open('/dev/shm/big', 'wb') as file:\n    for _ in range(30):\n"
                      "        file.write(bytes(10 * 2**20))")
    assert "No space left on device" in result, result
    assert tool.run("import os; os.remove('/dev/shm/big'); 'ok'") == "'ok'"


@needs_bwrap
def test_the_code_cannot_make_user_namespaces(tool):
    """Nested user namespaces would let the code mount filesystems of its own (a tmpfs outside every limit) and
    reach more of the kernel; both ways to make one are refused."""
    result = tool.run("import ctypes, subprocess\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "print(libc.unshare(0x10000000), ctypes.get_errno())\n"
                      "print(subprocess.run(['unshare', '-Urm', 'true'], capture_output=True).returncode)")
    assert result.split() == ["-1", "1", "1"], result


@needs_bwrap
def test_output_written_between_calls_is_bounded_in_the_host():
    """A thread that keeps writing after its call returned: the host holds only the tail of it (shown at the
    next call, with the count of what was cut), not every message the kernel sent."""
    with _sandboxed(memory_mb=2048) as tool:
        tool.run("import sys, threading, time\n"
                 "def spam():\n    for _ in range(48):\n        sys.stdout.write('y' * 4_000_000)\n"
                 "        sys.stdout.flush()\n        time.sleep(0.02)\n    print('done')\n"
                 "threading.Thread(target=spam).start()")
        before = _resident_bytes()
        time.sleep(8)  # 192 MB written meanwhile
        grown = _resident_bytes() - before
        result = tool.run("1 + 1")
    assert grown < 64 * 2**20, grown / 2**20
    assert "output truncated" in result and result.endswith("done\n[This call:]\n2"), result[-200:]


@needs_bwrap
def test_files_planted_for_the_next_kernel_are_not_read_by_it():
    """Code that leaves an IPython startup file (and a module shadowing the kernel's launcher in /mnt/data, its
    working folder) and kills its kernel: the next kernel starts clean, at once."""
    with _sandboxed() as tool:
        planted = tool.run("import os\nos.makedirs('/tmp/.ipython/profile_default/startup', exist_ok=True)\n"
                           "for path in ('/tmp/.ipython/profile_default/startup/00.py', "
                           "'/mnt/data/ipykernel_launcher.py'):\n"
                           "    print(open(path, 'w').write('import time; time.sleep(3600)'))")
        assert planted == "29\n29", planted
        assert "The python kernel died" in tool.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        start = time.monotonic()
        assert tool.run("6 * 7") == "42"
        assert time.monotonic() - start < 20


@needs_bwrap
def test_a_kernel_left_with_too_many_threads_is_restarted():
    """Sleeping threads in the kernel itself (not processes it left behind) that hold most of the process limit:
    the kernel could no longer start a subprocess, so it is restarted."""
    with _sandboxed(memory_mb=4096) as tool:  # each thread's stack counts against the address space too
        result = tool.run("import threading, time\n"
                          "for _ in range(40):\n    threading.Thread(target=time.sleep, args=(3600,)).start()")
        assert "the kernel was restarted" in result, result
        assert tool.run("import subprocess; subprocess.run(['true']).returncode") == "0"


@needs_bwrap
def test_mnt_data_past_its_cap_stops_the_kernel_and_the_files_can_be_removed(tmp_path):
    """Files past scratch_mb: the kernel is stopped within about a second, the next kernel may remove what is
    there, and no one file may pass the cap."""
    with _sandboxed(scratch_dir=tmp_path, scratch_mb=64, wall_seconds=20) as tool:
        result = tool.run("import time\nfor i in range(100):\n    open(f'/mnt/data/{i}', 'wb').write(bytes(2**20))\n"
                          "    time.sleep(0.05)")
        assert "/mnt/data went past its cap of 64 MB" in result, result
        assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 100 * 2**20
        assert tool.run("import os\nfor name in os.listdir('.'):\n    os.remove(name)\nlen(os.listdir('.'))") == "0"
        # from an empty folder, so that the file alone is measured: while the folder still held what the first
        # kernel left, the watcher could (on a loaded machine) stop this kernel mid-write, before the write failed
        assert "File too large" in tool.run("open('/mnt/data/big', 'wb').write(bytes(65 * 2**20))")
        assert (tmp_path / "big").stat().st_size == 64 * 2**20


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
        # the fork that fails (BlockingIOError) may be a child's: on a loaded machine the parent forks on as
        # children die, until the wall limit; either way the crowded kernel is replaced
        assert "the kernel was restarted" in result, result
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


ORDINARY_UID = 65534  # nobody


def _reachable_by_anyone(paths: list[str]) -> list[str]:
    """bwrap options that make `paths` reachable by any user: each folder above them that others may not pass (a
    root-only home holding this Python, say) is covered by an empty one, into which the paths are bound."""
    covered, folders, binds = {}, {}, []
    for path in dict.fromkeys(os.path.realpath(path) for path in paths):
        above = list(reversed(Path(path).parents))
        closed = [index for index, folder in enumerate(above) if not os.stat(folder).st_mode & 0o001]
        if closed:
            covered[str(above[closed[0]])] = None
            folders.update(dict.fromkeys(str(folder) for folder in above[closed[0] + 1:]))  # bwrap would make 0700
            binds += ["--ro-bind", path, path]
    return [*(arg for folder in covered for arg in ("--perms", "0755", "--tmpfs", folder)),
            *(arg for folder in folders for arg in ("--perms", "0755", "--dir", folder)), *binds]


@needs_bwrap
def test_every_sandbox_test_holds_for_an_ordinary_user():
    """`serve --tools python` is normally run by an ordinary user, for whom bubblewrap's own helper and the
    sandbox's filesystems belong to the caller: this module's tests again, run by uid 65534 (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("this run of the module already is an ordinary user's")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run the tests as another user")
    paths = [sys.base_prefix, sys.prefix, str(Path(sys.executable).resolve().parent), str(ROOT)]
    home = Path(tempfile.mkdtemp(prefix="gptoss-ordinary-"))
    os.chown(home, ORDINARY_UID, ORDINARY_UID)
    try:
        result = subprocess.run(
            [BWRAP, "--dev-bind", "/", "/", *_reachable_by_anyone(paths), "--cap-add", "CAP_SETUID", "--cap-add",
             "CAP_SETGID", "setpriv", f"--reuid={ORDINARY_UID}", f"--regid={ORDINARY_UID}", "--clear-groups",
             "env", f"HOME={home}", f"TMPDIR={home}", "PYTHONDONTWRITEBYTECODE=1", sys.executable, "-m", "pytest",
             __file__, "-q", "-n", "0", "-p", "no:cacheprovider", "-k", "not ordinary_user"],
            cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]
    assert " skipped" not in result.stdout, result.stdout[-3000:]
