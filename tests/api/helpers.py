"""Helpers of the API tests: job polling, metrics parsing, process resources, a controllable pipeline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from musetalk_service.errors import Cancelled

FINISHED = ("succeeded", "failed", "cancelled")


def assert_error(response: httpx.Response, status: int, code: str, *named: str) -> dict:
    """The response is `{error: {code, message}}` with this status, and the message names each of `named`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for text in named:
        assert text in error["message"], error
    return error


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60, until=FINISHED) -> dict:
    """Poll GET /jobs/{id} until its status is one of `until`; the last view."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/jobs/{job_id}").json()
        if view["status"] in until:
            return view
        assert time.monotonic() < deadline, f"job {job_id} still {view['status']} after {timeout} s: {view}"
        time.sleep(0.02)


def wait_until(condition, timeout: float = 30, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{message} not met within {timeout} s"
        time.sleep(0.02)


def metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(client: httpx.Client, name: str, **labels) -> float:
    return metrics(client).get((name, tuple(sorted(labels.items()))), 0.0)


# --- process resources -------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> set[tuple[str, str]]:
    """(fd, what it points at) for each open descriptor: a reused number shows as a new pair."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # closed while listing (the listing's own descriptor)
            continue
    return found


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def files_under(*folders: Path) -> list[Path]:
    """Everything below `folders`. The server may be deleting part of it during the walk (a
    cancelled upload's folder): a walk that meets a folder gone meanwhile starts again."""
    while True:
        try:
            return sorted(p for folder in folders if folder.exists() for p in folder.rglob("*"))
        except FileNotFoundError:
            continue


# --- a controllable pipeline ------------------------------------------------------------------------


class ControlledPipeline:
    """The real pipeline, with levers: `gate` holds each run at its start (cancel still works, as
    between two batches, unless `honour_cancel` is false), `device_hang` makes `device_ok` block until it is cleared, and
    `gpu_memory_value` is what `gpu_memory` reports, `fail_with` an error every run raises. Everything else is the real pipeline's."""

    def __init__(self, inner, *, gated: bool = False, honour_cancel: bool = True):
        self.inner = inner
        self.honour_cancel = honour_cancel
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started: list[object] = []
        self.device_hang = threading.Event()
        self.device_release = threading.Event()
        self.gpu_memory_value = None
        self.runs = 0
        self.fail_with: Exception | None = None

    def run(self, request, progress=None, cancel=None):
        self.started.append(request)
        self.runs += 1
        while not self.gate.wait(0.01):
            if self.honour_cancel and cancel is not None and cancel.is_set():
                raise Cancelled("the job was cancelled")
        if self.fail_with is not None:
            raise self.fail_with
        return self.inner.run(request, progress, cancel)

    def device_ok(self) -> bool:
        if self.device_hang.is_set():
            self.device_release.wait()
        return self.inner.device_ok()

    def gpu_memory(self):
        return self.gpu_memory_value

    def __getattr__(self, name):
        return getattr(self.inner, name)
