"""HTTP routes: probes and metrics, jobs and the synchronous lip-sync, avatars.

Every lip-sync or avatar preparation is a job on the one GPU queue (`api/jobs.py`); its body is
turned into a checked request before it is queued (`api/requests.py`).
"""

from musetalk_service.api.routes import avatars, jobs, probes

ROUTERS = (probes.router, jobs.router, avatars.router)
"""Every route of the service, in the order of the OpenAPI document; `create_app` includes each."""
