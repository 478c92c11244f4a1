import contextlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# What offline machines carry beside the checkout (DESIGN.md §5); a fresh clone has none of it.
SHARED = Path(__file__).resolve().parents[2] / "shared"


def needs_shared(relative: str):
    """A skip mark for a test that reads `relative` from ../shared, naming the file it lacks."""
    return pytest.mark.skipif(not (SHARED / relative).is_file(), reason=f"needs ../shared/{relative}")


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ over all elements, computed in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (all probed at once, so they differ)."""
    probes = [socket.socket() for _ in range(count)]
    for probe in probes:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in probes]
    for probe in probes:
        probe.close()
    return ports


def wait_until_healthy(url: str, processes, log=None, timeout: float = 300) -> None:
    """Polls the server's /health until it answers; fails with the server's output (`log`, an open file it writes
    to, or its stdout pipe) if a process dies or time runs out."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except OSError:
            if any(p.poll() is not None for p in processes) or time.time() > deadline:
                if log is not None:
                    log.seek(0)
                    output = log.read()
                else:
                    output = processes[0].communicate(timeout=5)[0] if processes[0].stdout else ""
                raise AssertionError(f"the server did not start:\n{(output or '')[-3000:]}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def serving(checkpoint, *arguments: str, name: str = "demo", log: Path | None = None):
    """`gptoss-jax serve` on the checkpoint, in its own process on 127.0.0.1, serving it as `name`; yields its
    base URL. Its output (startup lines, access log) goes to `log`, else a temporary file (a pipe nobody reads
    would fill and stall the server)."""
    port, = free_ports(1)
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gptoss_jax.cli", "serve", "--checkpoint", str(checkpoint), "--dtype", "float32",
             "--port", str(port), "--served-model-name", name, *arguments], stdout=output, stderr=subprocess.STDOUT,
            text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, [process], output)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=60)


def wait_for_checkpoint(process, output: Path, timeout=300):
    """Until a training process has written a checkpoint of step 2 or later (fails if it exits first)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        checkpoints = output / "checkpoints"
        if checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in checkpoints.iterdir()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint appeared: {process.communicate()[0][-3000:] if process.poll() else ''}")


def killed_run_resumes_bit_identically(start, root: Path) -> None:
    """`start(output) -> Popen` launches a training run. One run goes straight through; another is SIGKILLed after
    its step-2 checkpoint and started again in the same folder: both must end with bit-identical adapters."""
    import signal

    from safetensors.numpy import load_file

    straight = start(root / "straight")
    interrupted = start(root / "killed")
    wait_for_checkpoint(interrupted, root / "killed")
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert not (root / "killed" / "adapter").exists()  # it did not finish
    resumed = start(root / "killed")
    for process in (straight, resumed):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    a = load_file(root / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def whole_cache_copies(hlo: str, cache) -> list[str]:
    """The instructions of an optimized HLO module that write an array the size of one of the cache's key/value
    stacks (a copy, transpose or concatenation of a whole cache) other than the cache updated in place (scatter
    or dynamic-update-slice fusions, which write into their operand's buffer)."""
    stacks = {tuple(sorted(a.shape)) for a in (cache.banded_k, cache.full_k)}  # in any order of the axes
    return arrays_written(hlo, lambda shape: tuple(sorted(shape)) in stacks)


def arrays_written(hlo: str, matches: Callable[[tuple[int, ...]], bool]) -> list[str]:
    """The instructions of an optimized HLO module that write an array whose shape `matches`, other than
    parameters, views and in-place updates (scatter or dynamic-update-slice fusions)."""
    fused = set(re.findall(r"kind=k\w+, calls=%([\w.-]+)", hlo))  # a fusion's body writes nothing of its own
    found, computation = [], None
    for line in hlo.splitlines():
        if heading := re.match(r"(ENTRY )?%([\w.-]+) .*\{$", line):
            computation = heading[2]
        if computation in fused:
            continue
        match = re.match(r"\s*(ROOT )?%(\S+) = \w+\[([0-9,]*)\]\S* (\S+)\(", line)
        if not match or not matches(tuple(int(d) for d in match[3].split(",") if d)):
            continue
        name, opcode = match[2], match[4]
        in_place = opcode in ("scatter", "dynamic-update-slice") or (
            opcode == "fusion" and re.search(r"scatter|dynamic.update.slice", name))
        if not in_place and opcode not in ("parameter", "get-tuple-element", "bitcast", "tuple", "while"):
            found.append(line.strip()[:160])
    return found


@contextlib.contextmanager
def hub_stand_in():
    """A local stand-in for the Hugging Face hub's upload API (create a repo, preupload, commit: what
    huggingface_hub's `create_repo` and `upload_folder` call), for tests on machines without network. Every file
    is taken inline ("regular" upload mode). Yields (its URL, what it received: {"repos": [create request
    bodies], "files": {repo/path: bytes}, "commits": [(repo, summary)], "tokens": {Authorization headers}})."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = {"repos": [], "files": {}, "commits": [], "tokens": set()}

    class Hub(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            received["tokens"].add(self.headers.get("authorization"))
            url = f"http://127.0.0.1:{self.server.server_port}"
            if self.path == "/api/repos/create":
                request = json.loads(body)
                received["repos"].append(request)
                return self._reply({"url": f"{url}/{request['organization']}/{request['name']}"})
            repo = "/".join(self.path.split("/")[3:5])  # /api/models/<owner>/<name>/...
            if "/preupload/" in self.path:
                return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in json.loads(body)["files"]]})
            if "/commit/" in self.path:
                for line in body.decode().splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "header":
                        received["commits"].append((repo, entry["value"]["summary"]))
                    elif entry["key"] == "file":
                        received["files"][f"{repo}/{entry['value']['path']}"] = base64.b64decode(
                            entry["value"]["content"])
                return self._reply({"commitUrl": f"{url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
            self._reply({"error": f"not served by the stand-in: {self.path}"}, 404)

        def do_GET(self):  # noqa: N802
            self._reply({"error": f"not served by the stand-in: {self.path}"}, 404)

        def _reply(self, payload, status=200):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()


def wandb_offline_history(folder: Path) -> tuple[dict, list[dict]]:
    """(the run's config, its logged rows) of the offline W&B run under `folder` (WANDB_MODE=offline), read from
    its run-<id>.wandb file: W&B's record log (LevelDB's log format: 32 KiB blocks of checksum, length, type
    chunks, after a 7-byte W&B header) of its protobuf records."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, position, pending, records = path.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 2):  # a whole record, or its first chunk
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    config, rows = {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.run.config.update})
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return config, rows
