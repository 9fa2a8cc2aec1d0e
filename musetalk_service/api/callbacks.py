"""Webhooks: a job's final status POSTed once to its `callback_url`, so a backend need not poll.

The body is the job's view as `GET /jobs/{job_id}` shows it, as JSON. With `urls.callback_secret`
set, header `X-MuseTalk-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>` lets the
receiver check it came from this service. Delivery runs in a thread of its own (a slow receiver
never holds the job queue): connection errors and non-2xx answers are retried
`urls.callback_attempts` times in all with doubling backoff, then given up with a warning. The
first 2xx ends it: the receiver gets the status once, unless it answers too late for this side
to see its 2xx (at-least-once, as every webhook).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

import httpx

from musetalk_service.api.remote_media import shown
from musetalk_service.settings import UrlSettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MuseTalk-Signature"


def signature(body: bytes, secret: str) -> str:
    """The signature header's value for `body`: `sha256=<hex digest>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class CallbackSender:
    """Sends callbacks in background threads; `close(timeout)` waits for those still trying."""

    def __init__(self, settings: UrlSettings):
        self.settings = settings
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def send(self, url: str, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        thread = threading.Thread(target=self._deliver, args=(url, body), name="musetalk-callback", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _deliver(self, url: str, body: bytes) -> None:
        settings = self.settings
        headers = {"Content-Type": "application/json"}
        if settings.callback_secret:
            headers[SIGNATURE_HEADER] = signature(body, settings.callback_secret)
        timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
        last = ""
        try:
            for attempt in range(settings.callback_attempts):
                # Waits end early on close(): the service is stopping, the remaining tries go at once.
                if attempt:
                    self._closed.wait(settings.retry_backoff_s * 2 ** (attempt - 1))
                try:
                    response = httpx.post(url, content=body, headers=headers, timeout=timeout, follow_redirects=False)
                except httpx.TransportError as e:
                    last = type(e).__name__
                    continue
                if response.is_success:
                    return
                last = f"HTTP {response.status_code}"
            log.warning("callback to %s given up after %d tries: %s", shown(url), settings.callback_attempts, last)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def close(self, timeout: float) -> None:
        """Stop waiting between tries and give the pending deliveries up to `timeout` seconds."""
        self._closed.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
