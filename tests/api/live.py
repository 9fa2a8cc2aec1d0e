"""A real uvicorn server on loopback, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
