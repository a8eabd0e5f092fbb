"""Real servers for the service tests: `flux_kontext_optimized.py serve --model tiny` in a subprocess
on a loopback port, its output in a log file (a pipe nobody reads would block it under load).

Starting one costs ~15 s (importing diffusers), so servers are shared: `shared_server(pytestconfig,
"api", ...)` starts one the first time and stops it when the test session ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TEST_PORT_ENV = "FLUX_KONTEXT_TEST_PORT"  # where the README's literal curl commands (port 8000) are run
START_TIMEOUT_S = 180.0

_servers: dict[str, "ServerProcess"] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def literal_port() -> int:
    """8000 (the port the README's curl commands name) unless $FLUX_KONTEXT_TEST_PORT says otherwise
    or 8000 is taken; the caller then substitutes the port into the command."""
    wanted = int(os.environ.get(TEST_PORT_ENV, "8000"))
    return wanted if port_is_free(wanted) else free_port()


class ServerProcess:
    def __init__(self, name: str, args: list[str], port: int | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix=f"kontext-{name}-", suffix=".log")[1])
        command = [
            sys.executable,
            str(ROOT / "flux_kontext_optimized.py"),
            "serve",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=environment)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server {self.name} not ready after {timeout:.0f} s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self, grace_s: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        if self.process.returncode == 0:  # a clean exit: nothing to look at
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode


def start_server(name: str, args: list[str], port: int | None = None, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(name, args, port, env).wait_ready()


def shared_server(pytestconfig, name: str, args: list[str], port: int | None = None, env: dict[str, str] | None = None) -> ServerProcess:
    """One server per name for the whole session (several test modules use the same one)."""
    server = _servers.get(name)
    if server is None or server.process.poll() is not None:
        server = start_server(name, args, port, env)
        _servers[name] = server
        pytestconfig.add_cleanup(server.stop)
    return server


# -- the two shared servers ---------------------------------------------------------------------------
API_KEY = "test-key-0123456789"


def api_server(pytestconfig) -> ServerProcess:
    """Default limits (what the README's commands talk to), but a 4 MB body cap for the size test and
    a 64x64 benchmark (28-step edits of 256x256 take seconds on a busy CPU)."""
    return shared_server(pytestconfig, "api", ["--queue-size", "8", "--max-body-mb", "4", "--benchmark-size", "64"], port=literal_port())


def guarded_server(pytestconfig) -> ServerProcess:
    """API key on, a small queue, tight limits: for auth, load and schemathesis, whose generated
    requests must stay cheap: no per-request variants (so no compile), at most 64x64 and 4 steps,
    a one-edit benchmark. (Requests without a size ask for the tiny model's 256x256: refused here.)"""
    args = [
        "--queue-size",
        "4",
        "--request-timeout",
        "60",
        "--no-per-request-variants",
        "--max-size",
        "64",
        "--max-pixels",
        "8192",
        "--max-steps",
        "4",
        "--default-steps",
        "2",
        "--max-images",
        "2",
        "--benchmark-stages",
        "0",
        "--benchmark-warmup",
        "0",
        "--benchmark-repeats",
        "1",
        "--benchmark-size",
        "16",
        "--api-key-env",
        "KONTEXT_TEST_API_KEY",
    ]
    return shared_server(pytestconfig, "guarded", args, env={"KONTEXT_TEST_API_KEY": API_KEY})
