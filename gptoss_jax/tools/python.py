"""The gpt-oss built-in `python` tool: the model's code runs in a stateful Jupyter kernel inside a sandbox.

gpt-oss was trained against this tool as harmony describes it: code goes to a stateful Jupyter notebook, the
answer is the execution's output or a timeout after 120 seconds, files saved in /mnt/data persist, and there is no
internet. So each `PythonTool` (one per conversation) drives one real ipykernel through jupyter_client, and `run`
turns one execution into the text the model reads: stream output, the last expression's value, the tail of a
traceback, cut to a length the context can take.

The kernel runs under bubblewrap (README, "The python tool's sandbox"): its own mount, pid, ipc, uts and network
namespaces, a read-only filesystem of system folders and this Python environment in which only /mnt/data (a host
folder) and /tmp (a capped tmpfs, /dev/shm within it) are writable, and a small bootstrap inside that sets
resource limits, (when we are root) drops to an unprivileged uid and refuses new user namespaces before it becomes
the kernel. A kernel that runs past its time is interrupted, one that dies, ignores the interrupt, is left
crowded with threads or takes /mnt/data past its cap is replaced; either way the model is told, and the host
carries on. A thread of the host reads the kernel's output all the time, so what the code writes between calls
is cut to its head and tail as it arrives instead of piling up in the host.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import platform
import queue
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jupyter_client import KernelManager

log = logging.getLogger(__name__)

# When we are root the kernel runs as a uid drawn from here that no account uses: RLIMIT_NPROC, which root is exempt
# from, then counts the processes of this sandbox alone, and no file outside the scratch folder is its own.
SANDBOX_UIDS = range(2**30, 2**31 - 1)
SCRATCH = "/mnt/data"  # where the model was told its files live
TRACEBACK_LINES = 20  # the end of a traceback names the error; the frames above it mostly cost context
STARTUP_SECONDS = 60.0
INTERRUPT_GRACE_SECONDS = 5.0  # how long an interrupted execution gets to stop before the kernel is replaced
SCRATCH_CHECK_SECONDS = 1.0  # how often the size of the scratch folder is measured
SCRATCH_MAX_ENTRIES = 100_000  # a scratch folder with more files and folders than this counts as over its cap
# What bwrap itself is started with: process 1 of the sandbox is bwrap's helper, whose environment the code can read.
_HOST_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_LAUNCHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="python-tool-launcher")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_INSTALL_HINT = (
    "Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), or run the "
    "python tool without isolation: --unsafe-python-tool (PythonTool(unsafe=True))."
)

# Runs inside the sandbox (python -I), before the kernel: the limits it sets, the uid it drops to and the seccomp
# filter it installs are inherited by the kernel and everything the model's code starts. argv: uid (-1: keep
# ours), cpu seconds, address-space bytes, processes, file-size bytes, the filter (hex; "-": none), then the
# command to become. It enters the scratch folder only as that uid: root without its capabilities may not pass a
# folder that the uid owns and keeps to itself.
_BOOTSTRAP = f"""
import ctypes, os, resource, sys
uid, cpu, memory, processes, file_size = map(int, sys.argv[1:6])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))  # SIGXCPU, then SIGKILL 5 s later
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))  # Python writes get EFBIG (SIGXFSZ ignored)
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
if sys.argv[6] != "-":
    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    code = bytes.fromhex(sys.argv[6])
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP with SECCOMP_MODE_FILTER
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Program(len(code) // 8, code)), 0, 0):
        raise OSError(ctypes.get_errno(), "the seccomp filter could not be installed")
os.chdir({SCRATCH!r})
os.execv(sys.argv[7], sys.argv[7:])
"""

# Classic BPF for seccomp: refuse unshare and clone with CLONE_NEWUSER (a user namespace would let the code mount
# filesystems of its own, outside every limit, and reach more of the kernel), clone3 with ENOSYS (its flags lie in
# memory a filter cannot read; glibc then falls back to clone), and other ABIs' system calls (i386, x32), whose
# numbers differ. Per architecture: its audit id, then the numbers of clone, unshare and clone3.
_SYSCALLS = {"x86_64": (0xC000003E, 56, 272, 435), "aarch64": (0xC00000B7, 220, 97, 435)}
_BPF_LOAD, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RETURN = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _EPERM, _ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
_CLONE_NEWUSER, _X32_SYSCALL_BIT = 0x10000000, 0x40000000



def _user_namespace_filter() -> str:
    """The seccomp program above for this machine, in hex ("-" where its system call numbers are not known here)."""
    if platform.machine() not in _SYSCALLS:
        return "-"
    arch, clone, unshare, clone3 = _SYSCALLS[platform.machine()]
    program = [  # (code, jump if true, jump if false, k); a jump skips that many instructions
        (_BPF_LOAD, 0, 0, 4),                 # 0  the system call's architecture
        (_BPF_JEQ, 0, 8, arch),               # 1  another ABI: -> 10
        (_BPF_LOAD, 0, 0, 0),                 # 2  its number
        (_BPF_JGE, 6, 0, _X32_SYSCALL_BIT),   # 3  x32: -> 10
        (_BPF_JEQ, 6, 0, clone3),             # 4  -> 11
        (_BPF_JEQ, 1, 0, unshare),            # 5  -> 7
        (_BPF_JEQ, 0, 2, clone),              # 6  neither: -> 9
        (_BPF_LOAD, 0, 0, 16),                # 7  the flags (low half of the first argument)
        (_BPF_JSET, 1, 0, _CLONE_NEWUSER),    # 8  a new user namespace: -> 10
        (_BPF_RETURN, 0, 0, _ALLOW),          # 9
        (_BPF_RETURN, 0, 0, _EPERM),          # 10
        (_BPF_RETURN, 0, 0, _ENOSYS),         # 11
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program).hex()


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create the sandbox on this machine."""


class _WrappedKernelManager(KernelManager):
    """A KernelManager whose kernel command starts with `prefix` (the sandbox), and whose connection file is
    owned by the uid the kernel will run as (jupyter_client writes it readable by its owner only)."""

    prefix: list[str] = []
    owner: int | None = None

    def format_kernel_cmd(self, extra_arguments=None):
        return [*self.prefix, *super().format_kernel_cmd(extra_arguments)]

    def write_connection_file(self, **kwargs):
        super().write_connection_file(**kwargs)
        if self.owner is not None:
            os.chown(self.connection_file, self.owner, self.owner)


class PythonTool:
    """One conversation's python tool: a stateful kernel that lives until `close` (or the end of a `with`).

    scratch_dir: the host folder the kernel sees as /mnt/data (None: a temporary one, removed on close). When we
      are root it is handed to the sandbox's uid, so the kernel can write there.
    unsafe: run the kernel without any isolation or resource limits (only the wall-time limit and the output
      cut apply), for machines without bubblewrap.
    cpu_seconds: CPU time each process in the sandbox may use over its life (RLIMIT_CPU); past it the process is
      killed (the kernel: and replaced). It stops the runaway background work that the wall limit does not.
    wall_seconds: how long one `run` may take before it is interrupted (harmony tells the model 120 s).
    memory_mb: address space per process (RLIMIT_AS); allocations past it raise MemoryError in the kernel.
    max_processes: processes and threads the sandbox may run at once (RLIMIT_NPROC): a fork bomb stops there, and
      a kernel left with half of them or more is restarted.
    tmp_mb: the size of /tmp, a tmpfs (host memory) that /dev/shm lies in; new with each kernel.
    scratch_mb: how much /mnt/data may hold: no file may grow past it (RLIMIT_FSIZE), and a kernel that takes the
      folder past it (or past what it held when the kernel started, if more) is stopped within a second or so.
    max_output_chars: the longest text `run` returns; longer output keeps its head and tail around a marker.
    bwrap: the bubblewrap executable, a name looked up on PATH or a path.
    """

    def __init__(self, *, scratch_dir: str | os.PathLike | None = None, unsafe: bool = False,
                 cpu_seconds: int = 600, wall_seconds: float = 120.0, memory_mb: int = 4096,
                 max_processes: int = 256, tmp_mb: int = 256, scratch_mb: int = 1024, max_output_chars: int = 16_000,
                 bwrap: str = "bwrap"):
        self.unsafe, self.wall_seconds, self.max_output_chars = unsafe, wall_seconds, max_output_chars
        self.limits = {"cpu_seconds": cpu_seconds, "memory_mb": memory_mb, "max_processes": max_processes,
                       "tmp_mb": tmp_mb, "scratch_mb": scratch_mb}
        self._owner = None if unsafe or os.geteuid() != 0 else random.SystemRandom().choice(SANDBOX_UIDS)
        executable = None if unsafe else _bwrap_executable(bwrap)  # raises SandboxUnavailable before any folder
        self._home = Path(os.path.realpath(tempfile.mkdtemp(prefix="gptoss-python-")))
        self.scratch_dir = Path(scratch_dir).resolve() if scratch_dir is not None else self._home / "data"
        for folder in (self._home / "conn", self.scratch_dir):
            folder.mkdir(parents=True, exist_ok=True)
            if self._owner is not None:
                os.chown(folder, self._owner, self._owner)
        self._manager: KernelManager | None = None
        self._client = None
        self._closed = False
        self._lock = threading.Lock()  # between a call and the thread that reads the kernel's output
        self._execution: _Execution | None = None
        self._idle = _Output(max_output_chars)  # what the code writes between calls
        self._stopped_why: str | None = None  # why the watcher stopped the kernel
        self._watcher: threading.Thread | None = None
        try:
            if unsafe:
                log.warning("The python tool runs WITHOUT a sandbox: the model's code can read and write your "
                            "files and reach the network as this user.")
                self._prefix = []
            else:
                self._prefix = _sandbox_options(executable) + self._binds() + self._bootstrap()
                _probe(self._prefix)
            self._start()
        except BaseException:
            shutil.rmtree(self._home, ignore_errors=True)
            raise

    def run(self, code: str) -> str:
        """Executes `code` in the kernel and returns what the model sees. Never raises for what the code does:
        errors, timeouts and a dead kernel all come back as text."""
        if self._closed:
            raise RuntimeError("this PythonTool is closed")
        try:
            notice = ""
            if self._client is not None and not self._manager.is_alive():  # stopped since the last call
                notice = (f"[{self._stopped_why or 'The python kernel died between calls'}: a fresh kernel runs "
                          f"this call and its state was lost (files in {SCRATCH} are kept).]\n")
                self._stop()
            if self._client is None:
                self._start()
            return notice + self._execute(code)
        except Exception as error:  # the machinery failed (not the code): the host must carry on
            log.exception("the python tool failed; restarting its kernel")
            self._stop()
            return f"[The python tool failed ({type(error).__name__}: {error}); its state was lost.]"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop()
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> PythonTool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _execute(self, code: str) -> str:
        with self._lock:  # so that the watcher cannot see this call's first messages before it knows the call
            idle, self._idle = self._idle, _Output(self.max_output_chars)
            execution = self._execution = _Execution(self._client.execute(code, allow_stdin=False),
                                                     _Output(self.max_output_chars))
        ended = self._collect(execution, time.monotonic() + self.wall_seconds)
        if ended == "timeout":
            self._client.control_channel.send(self._client.session.msg("interrupt_request", {}))
            ended = self._collect(execution, time.monotonic() + INTERRUPT_GRACE_SECONDS)
            if ended == "idle":
                execution.output.add(f"[Timed out after {self.wall_seconds:g} seconds: the execution was "
                                     "interrupted; the kernel's state is kept.]")
        with self._lock:
            self._execution = None
        output = execution.output
        if idle.text():
            output = _Output(self.max_output_chars)
            output.add(f"[Written since the last call:]\n{idle.text()}\n[This call:]\n{execution.output.text()}")
        kept = f"its state was lost (files in {SCRATCH} are kept)"
        if ended == "timeout":
            output.add(f"[Timed out after {self.wall_seconds:g} seconds and did not stop when interrupted: the "
                       f"kernel was restarted and {kept}.]")
        elif ended == "died" and self._stopped_why:
            output.add(f"[{self._stopped_why}: a fresh kernel runs the next call and {kept}.]")
        elif ended == "died":
            limits = "" if self.unsafe else f" (past the CPU-time limit of {self.limits['cpu_seconds']} s?)"
            output.add(f"[The python kernel died{limits}: a fresh kernel runs the next call and {kept}.]")
        elif self._crowded():
            output.add(f"[The code left processes or threads running that hold half or more of the sandbox's "
                       f"{self.limits['max_processes']}: the kernel was restarted and {kept}.]")
        else:
            return output.text()
        self._restart()
        return output.text()

    def _crowded(self) -> bool:
        """Whether the processes and threads the code left behind (a fork bomb's, or sleeping threads in the
        kernel itself) hold half or more of the process limit, which leaves the kernel unable to start the
        threads and subprocesses it needs. Fewer may keep running between calls, as they would in a notebook."""
        if self.unsafe:
            return False
        tasks = _descendants(self._manager.provisioner.process.pid)
        return sum(threads for _, threads in tasks.values()) - self._sandbox_threads >= self.limits["max_processes"] / 2

    def _collect(self, execution: _Execution, deadline: float) -> str:
        """Waits until the kernel is idle after `execution` ("idle"; the watcher gathers its output), the deadline
        passes ("timeout") or the kernel process is gone ("died")."""
        while (remaining := deadline - time.monotonic()) > 0:
            if execution.idle.wait(min(remaining, 1.0)):
                return "idle"
            if not self._manager.is_alive():
                return "died"
        return "timeout"

    def _watch(self, client, manager: KernelManager, stop: threading.Event) -> None:
        """The watcher, a thread per kernel: reads every message the kernel publishes as it comes (into the
        running call's output, or the bounded output of the time between calls) and measures /mnt/data."""
        held = _folder_size(self.scratch_dir)
        allowed = max(self.limits["scratch_mb"] * 2**20, held[0]), max(SCRATCH_MAX_ENTRIES, held[1])
        measured = time.monotonic()
        while not stop.is_set():
            try:
                msg = client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                msg = None
            if msg is not None:
                with self._lock:
                    execution = self._execution
                    running = execution is not None and msg["parent_header"].get("msg_id") == execution.msg_id
                    _add_message(execution.output if running else self._idle, msg)
                    if running and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                        execution.idle.set()
            if not self.unsafe and time.monotonic() - measured >= SCRATCH_CHECK_SECONDS:
                measured = time.monotonic()
                if any(now > most for now, most in zip(_folder_size(self.scratch_dir, allowed), allowed, strict=True)):
                    self._stopped_why = (f"{SCRATCH} went past its cap of {self.limits['scratch_mb']} MB: the "
                                         "kernel was stopped (remove files to make room)")
                    os.kill(manager.provisioner.process.pid, signal.SIGKILL)  # bwrap: the whole sandbox ends
                    return

    def _binds(self) -> list[str]:
        """The sandbox's filesystem: read-only system folders and Python environment, a /dev of the harmless
        devices, a capped tmpfs at /tmp, the kernel's connection folder at its host path (the ipc sockets are
        named by path) and the scratch folder; then everything else read-only."""
        readonly = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc"]
        for prefix in (sys.prefix, sys.base_prefix, str(Path(os.path.realpath(sys.executable)).parents[1])):
            if not any(prefix == kept or prefix.startswith(kept + "/") for kept in readonly):
                readonly.append(prefix)
        conn = str(self._home / "conn")
        binds = [("--ro-bind-try", folder, folder) for folder in readonly]
        binds += [("--bind", conn, conn), ("--bind", str(self.scratch_dir), SCRATCH)]
        # bwrap makes the folders above a mount point readable by root only; the kernel's uid must pass them.
        parents = dict.fromkeys(str(parent) for *_, dest in binds for parent in reversed(Path(dest).parents[:-1]))
        devices = [arg for device in ("null", "zero", "full", "random", "urandom", "tty")
                   for arg in ("--dev-bind", f"/dev/{device}", f"/dev/{device}")]
        links = [("/proc/self/fd", "/dev/fd"), *((f"/proc/self/fd/{fd}", f"/dev/{name}") for fd, name in
                                                  enumerate(("stdin", "stdout", "stderr"))), ("/tmp", "/dev/shm")]
        return ["--perms", "1777", "--size", str(self.limits["tmp_mb"] * 2**20), "--tmpfs", "/tmp",  # first: the
                # binds below may lie under /tmp
                "--perms", "0755", "--tmpfs", "/dev", *devices,
                *[arg for target, link in links for arg in ("--symlink", target, link)],
                *[arg for parent in parents for arg in ("--perms", "0755", "--dir", parent)],
                *[arg for bind in binds for arg in bind],
                "--remount-ro", "/dev", "--remount-ro", "/"]

    def _bootstrap(self) -> list[str]:
        uid = -1 if self._owner is None else self._owner
        return [sys.executable, "-I", "-c", _BOOTSTRAP, str(uid), str(self.limits["cpu_seconds"]),
                str(self.limits["memory_mb"] * 2**20), str(self.limits["max_processes"]),
                str(self.limits["scratch_mb"] * 2**20), _user_namespace_filter()]

    def _start(self) -> None:
        manager = _WrappedKernelManager(kernel_name="python3", transport="ipc")
        manager.prefix, manager.owner = self._prefix, self._owner
        manager.connection_file = str(self._home / "conn" / "kernel.json")
        manager.ip = str(self._home / "conn" / "ipc")
        with open(self._home / "kernel.log", "wb") as kernel_log:
            # bwrap's --die-with-parent fires when the *thread* that started it ends, so every kernel is started
            # from one thread that lives as long as the process (a tool made in a short-lived worker thread, as
            # the agent loop and the server do, would otherwise lose its kernel with that thread).
            environment = {} if self.unsafe else {"env": dict(_HOST_ENVIRONMENT)}
            # The input history in memory only: a file would take room in the capped /tmp, and a full /tmp would
            # make IPython print an error into every call's output.
            _LAUNCHER.submit(manager.start_kernel, cwd=str(self.scratch_dir), stdout=kernel_log,
                             stderr=kernel_log, extra_arguments=["--HistoryManager.hist_file=:memory:"],
                             **environment).result()
        self._manager = manager
        self._client = manager.client()
        self._client.start_channels()
        try:
            self._client.wait_for_ready(timeout=STARTUP_SECONDS)
        except RuntimeError as error:
            output = (self._home / "kernel.log").read_text(errors="replace")[-2000:]
            self._stop()
            raise RuntimeError(f"the python kernel did not start: {error}\n{output}") from None
        # The threads that are the sandbox rather than the code's: bwrap's init and the kernel below it.
        self._sandbox_threads = sum(threads for _, threads in _descendants(manager.provisioner.process.pid).values())
        self._stopped_why = None
        self._watching = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(self._client, manager, self._watching),
                                         name="python-tool-watcher", daemon=True)
        self._watcher.start()

    def _stop(self) -> None:
        """Kills the kernel and, with bwrap, the whole sandbox: its pid namespace ends with bwrap's init."""
        client, manager = self._client, self._manager
        self._manager = self._client = None
        if client is not None:
            if self._watcher is not None:  # it reads the iopub socket, which is closed next
                self._watching.set()
                self._watcher.join()
                self._watcher = None
            client.stop_channels()
        if manager is not None and manager.has_kernel:
            manager.shutdown_kernel(now=True)

    def _restart(self) -> None:
        self._stop()
        self._start()


def _bwrap_executable(bwrap: str) -> str:
    executable = shutil.which(bwrap)
    if executable is None:
        raise SandboxUnavailable(f"The python tool's sandbox needs bubblewrap ({bwrap!r} is not on PATH). "
                                 + _INSTALL_HINT)
    return executable


def _sandbox_options(executable: str) -> list[str]:
    """bwrap's namespace and process options. As root, bwrap keeps only the capabilities the bootstrap needs
    to drop to an unprivileged uid (a user namespace would map that uid back to root, whose process count is not
    limited); otherwise bwrap makes a user namespace, as it must without privileges."""
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:
        privileges = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        privileges = ["--unshare-user"]
    # PYTHONSAFEPATH: `python -m ipykernel_launcher` does not put its working folder, /mnt/data, ahead of the
    # installed packages (a planted module there would run at every start); IPython adds it once started.
    environment = ["--clearenv", "--setenv", "PATH", f"{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin",
                   "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONSAFEPATH", "1"]
    return [executable, *namespaces, *privileges, *environment, "--die-with-parent", "--new-session",
            "--proc", "/proc"]


def _probe(prefix: list[str]) -> None:
    """Starts the sandbox once with a Python that imports ipykernel, so a sandbox that cannot work here fails
    now, with bwrap's own words, rather than as a kernel that never answers."""
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", "import ipykernel"], capture_output=True,
                                text=True, timeout=STARTUP_SECONDS, env=_HOST_ENVIRONMENT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SandboxUnavailable(f"bubblewrap could not start the python tool's sandbox: {error}. "
                                 + _INSTALL_HINT) from None
    if result.returncode != 0:
        raise SandboxUnavailable(f"bubblewrap could not start the python tool's sandbox (exit {result.returncode}): "
                                 f"{result.stderr.strip()[-1000:]}. " + _INSTALL_HINT)


def _descendants(root: int) -> dict[int, tuple[int, int]]:
    """The processes below host pid `root`, each with its parent and number of threads (from /proc)."""
    stats = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path("/proc", entry, "stat").read_text() if entry.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        if stat:
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command) "
            stats[int(entry)] = int(fields[1]), int(fields[17])
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, below = {}, [root]
    while below:
        for pid in children.get(below.pop(), []):
            found[pid] = stats[pid]
            below.append(pid)
    return found


def _folder_size(folder: Path, stop_past: tuple[int, int] | None = None) -> tuple[int, int]:
    """(bytes, files and folders) below `folder`, symbolic links not followed; the walk stops once either passes
    `stop_past`."""
    size = entries = 0
    below = [str(folder)]
    while below:
        try:
            with os.scandir(below.pop()) as scan:
                for entry in scan:
                    entries += 1
                    if entry.is_dir(follow_symlinks=False):
                        below.append(entry.path)
                    else:
                        size += entry.stat(follow_symlinks=False).st_size
        except OSError:  # removed meanwhile
            continue
        if stop_past is not None and (size > stop_past[0] or entries > stop_past[1]):
            break
    return size, entries


class _Execution:
    """One call: its message id, the output the watcher gathers for it, and whether the kernel is idle again."""

    def __init__(self, msg_id: str, output: _Output):
        self.msg_id, self.output, self.idle = msg_id, output, threading.Event()


def _add_message(output: _Output, msg: dict) -> None:
    """Adds what the model reads of one message the kernel published (streams, values, tracebacks) to `output`."""
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        output.add(content["text"])
    elif kind in ("execute_result", "display_data") and "text/plain" in content["data"]:
        output.add(content["data"]["text/plain"] + "\n")
    elif kind == "error":
        output.add(_traceback(content["traceback"]) + "\n")


class _Output:
    """The text one execution shows the model, cut to `limit` characters around a marker. Only its head and tail
    are held, so that code printing in a loop until the wall limit cannot fill the host's memory."""

    def __init__(self, limit: int):
        self.limit, self.held, self.dropped = limit, "", 0

    def add(self, text: str) -> None:
        self.held += text
        if len(self.held) > 4 * self.limit:
            self.dropped += len(self.held) - 2 * self.limit
            self.held = self.held[:self.limit] + self.held[-self.limit:]

    def text(self) -> str:
        text, total = self.held, len(self.held) + self.dropped
        if total > self.limit:
            head = self.limit // 2
            tail = self.limit - head
            text = (f"{text[:head]}\n[... output truncated: {total - self.limit} of {total} characters cut here "
                    f"...]\n{text[-tail:]}")
        # A progress bar's carriage-return rewrites reduced to what was left showing.
        lines = text.split("\n")
        return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines).rstrip("\n")


def _traceback(frames: list[str]) -> str:
    lines = _ANSI.sub("", "\n".join(frames)).splitlines()
    if len(lines) <= TRACEBACK_LINES:
        return "\n".join(lines)
    return "\n".join([f"[... {len(lines) - TRACEBACK_LINES} traceback lines above cut ...]",
                      *lines[-TRACEBACK_LINES:]])
