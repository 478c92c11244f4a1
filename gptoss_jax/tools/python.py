"""The gpt-oss built-in `python` tool: the model's code runs in a stateful Jupyter kernel inside a sandbox.

gpt-oss was trained against this tool as harmony describes it: code goes to a stateful Jupyter notebook, the
answer is the execution's output or a timeout after 120 seconds, files saved in /mnt/data persist, and there is no
internet. So each `PythonTool` (one per conversation) drives one real ipykernel through jupyter_client, and `run`
turns one execution into the text the model reads: stream output, the last expression's value, the tail of a
traceback, cut to a length the context can take.

The kernel runs under bubblewrap (README, "The python tool's sandbox"): its own mount, pid, ipc, uts and network
namespaces, a filesystem of read-only system folders and this Python environment with /mnt/data the only
writable folder of the user's, and a small bootstrap inside that sets resource limits and (when we are root)
drops to an unprivileged uid before it becomes the kernel. A kernel that runs past its time is interrupted, one
that dies or ignores the interrupt is replaced; either way the model is told, and the host carries on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
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
_LAUNCHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="python-tool-launcher")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_INSTALL_HINT = (
    "Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), or run the "
    "python tool without isolation: --unsafe-python-tool (PythonTool(unsafe=True))."
)

# Runs inside the sandbox, before the kernel: the limits it sets and the uid it drops to are inherited by the
# kernel and everything the model's code starts. argv: uid (-1: keep ours), cpu seconds, address-space bytes,
# processes, then the command to become. It enters the scratch folder only as that uid: root without its
# capabilities may not pass a folder that the uid owns and keeps to itself.
_BOOTSTRAP = f"""
import os, resource, sys
uid, cpu, memory, processes = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))  # SIGXCPU, then SIGKILL 5 s later
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.chdir({SCRATCH!r})
os.execv(sys.argv[5], sys.argv[5:])
"""


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
    max_processes: processes and threads the sandbox may run at once (RLIMIT_NPROC): a fork bomb stops there.
    max_output_chars: the longest text `run` returns; longer output keeps its head and tail around a marker.
    bwrap: the bubblewrap executable, a name looked up on PATH or a path.
    """

    def __init__(self, *, scratch_dir: str | os.PathLike | None = None, unsafe: bool = False,
                 cpu_seconds: int = 600, wall_seconds: float = 120.0, memory_mb: int = 4096,
                 max_processes: int = 256, max_output_chars: int = 16_000, bwrap: str = "bwrap"):
        self.unsafe, self.wall_seconds, self.max_output_chars = unsafe, wall_seconds, max_output_chars
        self.limits = {"cpu_seconds": cpu_seconds, "memory_mb": memory_mb, "max_processes": max_processes}
        self._owner = None if unsafe or os.geteuid() != 0 else random.SystemRandom().choice(SANDBOX_UIDS)
        executable = None if unsafe else _bwrap_executable(bwrap)  # raises SandboxUnavailable before any folder
        self._home = Path(os.path.realpath(tempfile.mkdtemp(prefix="gptoss-python-")))
        self.scratch_dir = Path(scratch_dir).resolve() if scratch_dir is not None else self._home / "data"
        for folder in (self._home / "conn", self._home / "tmp", self.scratch_dir):
            folder.mkdir(parents=True, exist_ok=True)
            if self._owner is not None:
                os.chown(folder, self._owner, self._owner)
        self._manager: KernelManager | None = None
        self._client = None
        self._closed = False
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
            if self._client is None:
                self._start()
            return self._execute(code)
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
        msg_id = self._client.execute(code, allow_stdin=False)
        output = _Output(self.max_output_chars)
        ended = self._collect(msg_id, output, time.monotonic() + self.wall_seconds)
        if ended == "timeout":
            self._client.control_channel.send(self._client.session.msg("interrupt_request", {}))
            ended = self._collect(msg_id, output, time.monotonic() + INTERRUPT_GRACE_SECONDS)
            if ended == "idle":
                output.add(f"[Timed out after {self.wall_seconds:g} seconds: the execution was interrupted; "
                             "the kernel's state is kept.]")
        kept = f"its state was lost (files in {SCRATCH} are kept)"
        if ended == "timeout":
            output.add(f"[Timed out after {self.wall_seconds:g} seconds and did not stop when interrupted: the "
                         f"kernel was restarted and {kept}.]")
        elif ended == "died":
            limits = "" if self.unsafe else f" (past the CPU-time limit of {self.limits['cpu_seconds']} s?)"
            output.add(f"[The python kernel died{limits}: a fresh kernel runs the next call and {kept}.]")
        elif self._crowded():
            output.add(f"[The code left processes running that hold half or more of the sandbox's "
                         f"{self.limits['max_processes']} processes and threads: the kernel was restarted and {kept}.]")
        else:
            return output.text()
        self._restart()
        return output.text()

    def _crowded(self) -> bool:
        """Whether the processes the code left behind (a fork bomb's, typically) hold half or more of the
        process limit, which leaves the kernel unable to start the threads it needs. Other processes may keep
        running between calls, as they would in a notebook."""
        if self.unsafe:
            return False
        tasks = _descendants(self._manager.provisioner.process.pid)
        left = sum(threads for pid, (_, threads) in tasks.items() if pid not in self._sandbox_pids)
        return left >= self.limits["max_processes"] / 2

    def _collect(self, msg_id: str, output: _Output, deadline: float) -> str:
        """Adds the outputs of execution `msg_id` to `output` until the kernel is idle again ("idle"), the
        deadline passes ("timeout") or the kernel process is gone ("died")."""
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = self._client.get_iopub_msg(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not self._manager.is_alive():
                    return "died"
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                output.add(content["text"])
            elif kind in ("execute_result", "display_data") and "text/plain" in content["data"]:
                output.add(content["data"]["text/plain"] + "\n")
            elif kind == "error":
                output.add(_traceback(content["traceback"]) + "\n")
            elif kind == "status" and content["execution_state"] == "idle":
                return "idle"
        return "timeout"

    def _binds(self) -> list[str]:
        """The sandbox's filesystem: read-only system folders and Python environment, a private /tmp, the
        kernel's connection folder at its host path (the ipc sockets are named by path) and the scratch folder."""
        readonly = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc"]
        for prefix in (sys.prefix, sys.base_prefix, str(Path(os.path.realpath(sys.executable)).parents[1])):
            if not any(prefix == kept or prefix.startswith(kept + "/") for kept in readonly):
                readonly.append(prefix)
        conn = str(self._home / "conn")
        binds = [("--ro-bind-try", folder, folder) for folder in readonly]
        binds += [("--bind", conn, conn), ("--bind", str(self.scratch_dir), SCRATCH)]
        # bwrap makes the folders above a mount point readable by root only; the kernel's uid must pass them.
        parents = dict.fromkeys(str(parent) for *_, dest in binds for parent in reversed(Path(dest).parents[:-1]))
        return ["--bind", str(self._home / "tmp"), "/tmp",  # first: the binds below may lie under /tmp
                *[arg for parent in parents for arg in ("--perms", "0755", "--dir", parent)],
                *[arg for bind in binds for arg in bind]]

    def _bootstrap(self) -> list[str]:
        uid = -1 if self._owner is None else self._owner
        return [sys.executable, "-c", _BOOTSTRAP, str(uid), str(self.limits["cpu_seconds"]),
                str(self.limits["memory_mb"] * 2**20), str(self.limits["max_processes"])]

    def _start(self) -> None:
        manager = _WrappedKernelManager(kernel_name="python3", transport="ipc")
        manager.prefix, manager.owner = self._prefix, self._owner
        manager.connection_file = str(self._home / "conn" / "kernel.json")
        manager.ip = str(self._home / "conn" / "ipc")
        with open(self._home / "kernel.log", "wb") as kernel_log:
            # bwrap's --die-with-parent fires when the *thread* that started it ends, so every kernel is started
            # from one thread that lives as long as the process (a tool made in a short-lived worker thread, as
            # the agent loop and the server do, would otherwise lose its kernel with that thread).
            _LAUNCHER.submit(manager.start_kernel, cwd=str(self.scratch_dir), stdout=kernel_log,
                             stderr=kernel_log).result()
        self._manager = manager
        self._client = manager.client()
        self._client.start_channels()
        try:
            self._client.wait_for_ready(timeout=STARTUP_SECONDS)
        except RuntimeError as error:
            output = (self._home / "kernel.log").read_text(errors="replace")[-2000:]
            self._stop()
            raise RuntimeError(f"the python kernel did not start: {error}\n{output}") from None
        # The processes that are the sandbox rather than the code's: bwrap's init and the kernel below it.
        self._sandbox_pids = set(_descendants(manager.provisioner.process.pid))

    def _stop(self) -> None:
        """Kills the kernel and, with bwrap, the whole sandbox: its pid namespace ends with bwrap's init."""
        client, manager = self._client, self._manager
        self._manager = self._client = None
        if client is not None:
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
    environment = ["--clearenv", "--setenv", "PATH", f"{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin",
                   "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    return [executable, *namespaces, *privileges, *environment, "--die-with-parent", "--new-session",
            "--dev", "/dev", "--proc", "/proc"]


def _probe(prefix: list[str]) -> None:
    """Starts the sandbox once with a Python that imports ipykernel, so a sandbox that cannot work here fails
    now, with bwrap's own words, rather than as a kernel that never answers."""
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", "import ipykernel"], capture_output=True,
                                text=True, timeout=STARTUP_SECONDS)
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
