"""A real uvicorn server on loopback: in a thread of the test process, or as a `serve` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from musetalk_service.api.app import ServiceServer

# Around the astronaut's face in the 256x256 media fixtures: random weights can't detect it.
FACE_BOX = [72, 20, 152, 100]


@contextmanager
def live_server(app: FastAPI, *, headers: dict[str, str] | None = None, servers: list | None = None) -> Iterator[httpx.Client]:
    """Serve `app` with uvicorn (the service's `ServiceServer`) in a thread; yields a client bound
    to it (sending `headers`), stops the server after. `servers` receives the server object."""
    # The socket is bound here and handed over, so no other process can take the port in between.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    server = ServiceServer(uvicorn.Config(app, log_config=None, lifespan="on"))
    if servers is not None:
        servers.append(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped during start-up (see the log)")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start within 120 s")
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=120, headers=headers) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_ready(client: httpx.Client, timeout: float = 120) -> httpx.Response:
    """Poll GET /ready until it answers 200 (or `timeout` passes); the last response."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/ready")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


CONSOLE_SCRIPT = Path(sys.executable).with_name("musetalk-service")


@dataclass
class ServeProcess:
    """A `musetalk-service serve` process and a client bound to it."""

    process: subprocess.Popen[bytes]
    client: httpx.Client
    log: Path
    """Its stdout and stderr."""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve_process(models_dir: Path, folder: Path, **env: str) -> Iterator[ServeProcess]:
    """`musetalk-service serve` on CPU in a process of its own, on a free loopback port, ready
    (/ready 200) when yielded. Output and work folders default to `folder`/out and `folder`/work;
    `env` adds MUSETALK_* variables. Killed after, if it is still running."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "work").mkdir(exist_ok=True)
    log = folder / f"serve-{time.monotonic_ns()}.log"
    environment = {**os.environ, "MUSETALK_OUTPUT_DIR": str(folder / "out"), "MUSETALK_WORK_DIR": str(folder / "work"), **env}
    port = _free_port()  # `serve` refuses port 0; another process could take it first, which is unlikely on loopback
    command = [str(CONSOLE_SCRIPT), "serve", "--models", str(models_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=environment, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Uvicorn running on" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start listening (exit {process.poll()}):\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            ready = wait_ready(client)
            assert ready.status_code == 200, ready.text
            yield ServeProcess(process, client, log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
