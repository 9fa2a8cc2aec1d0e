"""The ingress's view of the engine deployment: `RemoteEngine`, what the API's `Service` is given.

It answers the calls the service makes of an engine in its own process (`run`, `prepare_avatar`,
`run_url_task`, the avatar lookups, `health`, `device_ok`, `gpu_memory`) by calls to the engine
replicas (serve_ray/replica.py) through a Ray Serve handle. A job's call is a stream: progress
events go to the job's `progress`, the job's cancel event (a client's cancel, the time limit,
shutdown) cancels the call, and an error the engine raised is raised here as the same
`ServiceError`. A replica that dies mid-job fails the job with `engine_lost` (503).

The handle blocks; every call here is made from a thread that may block: the job manager's
workers, and for lookups a small pool of its own (routes call some of them on the event loop).
Readiness and the replica counts are read from Serve's status by a poller thread, so `/ready`
and `/health` never wait on the cluster.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle

from musetalk_service.api.remote_media import UrlTask
from musetalk_service.contract import LipsyncRequest
from musetalk_service.errors import Cancelled, ServiceError
from musetalk_service.media.mux import partial_outputs
from musetalk_service.serve_ray.replica import replica_work_dir

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

POLL_S = 0.5
"""How often the ingress reads the engine replicas' states from Serve."""
_CANCEL_POLL_S = 0.05


class EngineLost(ServiceError):
    """The engine replica running the job died (its process or node went away)."""

    code = "engine_lost"
    status = 503


@dataclass(frozen=True)
class ReplicaCounts:
    ready: int
    total: int


@dataclass(frozen=True)
class ReplicaResult:
    """An engine's result and the replica that made it (shown as `engine_replica`)."""

    result: Any
    replica: str

    def __getattr__(self, name: str) -> Any:
        # The job manager, metrics and routes read the result's fields (frames, timings, output_path).
        if name == "result":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.result, name)

    def with_warnings(self, warnings: Sequence[str]) -> ReplicaResult:
        """As `LipsyncResult.with_warnings`, keeping the replica (the check's warnings are the ingress's)."""
        return ReplicaResult(self.result.with_warnings(warnings), self.replica)

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "engine_replica": self.replica}


@dataclass(frozen=True)
class PreparedAvatar:
    """A prepared avatar as the ingress sees it: its summary (the latents stay on the replica)."""

    row: dict[str, Any]

    @property
    def video(self) -> str:
        return str(self.row.get("video", ""))

    def summary(self) -> dict[str, Any]:
        return dict(self.row)


class RemoteEngine:
    """The engine replicas of one Serve application, as one engine (see the module doc)."""

    def __init__(self, handle: DeploymentHandle, *, app_name: str, total: int, work_dir: Path | None):
        self._handle = handle
        self._work_dir = work_dir
        self._app_name = app_name
        self._deployment = handle.deployment_name
        self._total = total
        self._counts = ReplicaCounts(0, total)
        self._health: dict[str, Any] = {}
        self._lookups = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="musetalk-ray-call")
        self._poller = threading.Thread(target=self._poll, name="musetalk-ray-status", daemon=True)
        self._poller.start()

    # -- jobs ----------------------------------------------------------------------------------------

    def run(self, request: LipsyncRequest, progress: Progress | None, cancel: threading.Event | None) -> ReplicaResult:
        return self._job("run", request, request.avatar_id, progress, cancel)

    def run_url_task(self, task: UrlTask, progress: Progress | None, cancel: threading.Event | None) -> ReplicaResult:
        """Media by URL: the replica fetches the sources and uploads the output itself."""
        return self._job("run_url_task", task, task.request.avatar_id, progress, cancel)

    def prepare_avatar(self, request: LipsyncRequest, cancel: threading.Event | None) -> PreparedAvatar:
        return PreparedAvatar(self._job("prepare_avatar", request, None, None, cancel).result)

    def _job(self, method: str, payload: Any, avatar_id: str | None, progress: Progress | None, cancel: threading.Event | None) -> ReplicaResult:
        handle = self._handle.options(stream=True, multiplexed_model_id=avatar_id or "")
        stream = handle.job.remote(method, payload)
        finished = threading.Event()
        if cancel is not None:
            threading.Thread(target=self._cancel_on, args=(cancel, finished, stream), name="musetalk-ray-cancel", daemon=True).start()
        replica: str | None = None
        try:
            for event in stream:
                kind = event[0]
                if kind == "replica":
                    replica = event[1]
                elif kind == "progress":
                    if progress is not None:
                        progress(*event[1:])
                elif kind == "error":
                    raise event[1]
                else:
                    return ReplicaResult(event[1], replica)
            raise EngineLost(f"engine replica {replica or '(unknown)'} ended the job without a result")
        except (RequestCancelledError, TaskCancelledError) as e:
            raise Cancelled("the job was cancelled") from e
        except RayActorError as e:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the job was cancelled") from e
            log.error("engine replica %s died during a %s job: %s", replica, method, e)
            self._remove_leftovers(replica, payload)
            raise EngineLost(
                f"the engine replica running the job ({replica or 'not yet known'}) died; no output was written. "
                "Ray Serve replaces it: retry the request"
            ) from e
        finally:
            finished.set()

    def _remove_leftovers(self, replica: str | None, payload: Any) -> None:
        """What a replica that died mid-job left, where this host sees its disk: its work folder
        (temp files, fetched media) and a half-muxed output next to the job's output path."""
        if replica is not None:
            shutil.rmtree(replica_work_dir(self._work_dir, replica), ignore_errors=True)
        request = payload.request if isinstance(payload, UrlTask) else payload
        if request.output_path is not None:
            for part in partial_outputs(request.output_path):
                part.unlink(missing_ok=True)

    @staticmethod
    def _cancel_on(cancel: threading.Event, finished: threading.Event, stream: Any) -> None:
        """Cancel the call once `cancel` is set (the replica's engine stops at its next batch)."""
        while not finished.is_set():
            if cancel.wait(_CANCEL_POLL_S):
                if not finished.is_set():
                    stream.cancel()
                return

    # -- lookups -------------------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        call = getattr(self._handle, method)
        return self._lookups.submit(lambda: call.remote(*args).result()).result()

    def list_avatars(self) -> list[dict[str, Any]]:
        return self._call("list_avatars")

    def delete_avatar(self, avatar_id: str) -> bool:
        # To the replica that holds it in memory (others hold it only on the shared disk).
        call = self._handle.options(multiplexed_model_id=avatar_id).delete_avatar
        return self._lookups.submit(lambda: call.remote(avatar_id).result()).result()

    # -- health --------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """An engine replica's health (device, weights, encoder), as last read; never blocks."""
        return dict(self._health)

    def device_ok(self) -> bool:
        """At least one engine replica is ready (Ray's health check asks each replica's device)."""
        return self._counts.ready > 0

    def replica_counts(self) -> ReplicaCounts:
        return self._counts

    def gpu_memory(self) -> None:
        """Per replica, not one figure: Ray's own metrics show each replica's GPU."""
        return None

    def _poll(self) -> None:
        while True:
            try:
                self._counts = ReplicaCounts(self._ready_replicas(), self._total)
                if self._counts.ready and not self._health:
                    self._health = self._call("health")
            except Exception:  # noqa: BLE001 - a controller that does not answer: read again
                log.warning("could not read the engine replicas' state", exc_info=True)
                self._counts = ReplicaCounts(0, self._total)
            time.sleep(POLL_S)

    def _ready_replicas(self) -> int:
        app = serve.status().applications.get(self._app_name)
        deployment = app.deployments.get(self._deployment) if app is not None else None
        if deployment is None:
            return 0
        return int(deployment.replica_states.get("RUNNING", 0))
