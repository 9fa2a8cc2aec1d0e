"""The Ray Serve application: one CPU ingress serving the service's FastAPI app, and the engine.

    ingress (1 replica, CPU)  --DeploymentHandle-->  engine (ray.engine_replicas, 1 GPU each)
    api/app.create_app(settings, RemoteEngine)        serve_ray/replica.EngineReplica
    the job queue, auth, limits, metrics              LipsyncPipeline on the replica's device

The ingress is the service as one process runs it (same routes, schemas, errors, auth, limits,
metrics), given a `RemoteEngine` instead of a loaded pipeline and running one job per engine
replica. It stays one replica: its job queue is the deployment's one bounded queue (429 beyond it),
and job status lives there. `build` makes the application from settings (`serve --ray`);
`app_builder` is the same for `serve run configs/ray-serve.yaml`.
"""

from __future__ import annotations

from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from musetalk_service.api.app import create_app
from musetalk_service.serve_ray.remote import RemoteEngine
from musetalk_service.serve_ray.replica import ENGINE_CALLS, EngineReplica
from musetalk_service.settings import Settings, load_settings

ENGINE = "MuseTalkEngine"
INGRESS = "MuseTalkIngress"


@serve.ingress()
class Ingress:
    """The HTTP side: `create_app` over the engine deployment (see the module doc)."""

    def __init__(self, engine: DeploymentHandle, settings: dict[str, Any]):
        self.settings = Settings(**settings)
        # The application's name as deployed (a `serve run` config names it, not the settings).
        app_name = serve.get_replica_context().app_name
        self.engine = RemoteEngine(engine, app_name=app_name, total=self.settings.ray.engine_replicas, work_dir=self.settings.work_dir)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, self.engine, concurrency=self.settings.ray.engine_replicas)


def gpus_per_replica(settings: Settings) -> float:
    """`ray.gpus_per_replica`, with `auto`: 1 where the cluster has a GPU, else 0 (CPU replicas)."""
    wanted = settings.ray.gpus_per_replica
    if wanted != "auto":
        return float(wanted)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build(settings: Settings) -> Application:
    """The application for `settings` (call after `ray.init`: `auto` GPUs are read from the cluster)."""
    rs = settings.ray
    # Plain JSON: each replica rebuilds its Settings (paths, secrets) in its own process.
    config = settings.model_dump(mode="json")
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE,
        num_replicas=rs.engine_replicas,
        max_ongoing_requests=ENGINE_CALLS,
        ray_actor_options={"num_cpus": rs.cpus_per_replica, "num_gpus": gpus_per_replica(settings)},
        health_check_period_s=rs.health_check_period_s,
        health_check_timeout_s=rs.health_check_timeout_s,
        # A replica being stopped finishes its running job first, as the embedded service does.
        graceful_shutdown_timeout_s=settings.jobs.shutdown_timeout_s,
    ).bind(config)
    ingress = serve.deployment(
        Ingress,
        name=INGRESS,
        num_replicas=1,  # the one job queue of the deployment
        max_ongoing_requests=1000,  # HTTP requests; the job queue bounds the work (429 beyond it)
        ray_actor_options={"num_cpus": rs.ingress_cpus},
        graceful_shutdown_timeout_s=settings.jobs.shutdown_timeout_s,
    ).bind(engine, config)
    return ingress


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run` / `serve deploy` configs: `args.config` (a settings YAML, optional) plus
    `args.settings` (top-level keys replaced, as CLI flags replace them)."""
    settings = load_settings(args.get("config"), **(args.get("settings") or {}))
    return build(settings)
