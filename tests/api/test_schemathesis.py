"""The OpenAPI document against the real server: schemathesis generates requests from it (valid
and invalid) for every operation and checks each answer over HTTP on loopback.

Bounded: a few dozen examples per operation, derandomized, no deadline. The paths the fuzzer
sends are harmless: input and output roots are an empty temp folder, so no request reaches a
real file, and uploaded parts are random bytes that fail the media probe before any job starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from musetalk_service.api.app import create_app
from musetalk_service.settings import Settings
from tests.api.live import live_server

API_KEY = "fuzz-key"
EXAMPLES = 25

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance, ignored_auth]
SUBMISSIONS = {("POST", "/jobs"), ("POST", "/lipsync"), ("POST", "/avatars")}
"""Schema-valid submissions still name files that don't exist (400/403): positive-data acceptance
is checked on the other operations only."""


@pytest.fixture(scope="module")
def served(tiny_settings: Settings, tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz_root")
    settings = tiny_settings.model_copy(
        update={"input_roots": [root], "output_roots": [root], "output_dir": root, "api_key": API_KEY}
    )
    with live_server(create_app(settings, tiny_pipeline), headers={"X-API-Key": API_KEY}) as client:
        yield str(client.base_url)


def test_api_holds_to_its_openapi_document(served: str) -> None:
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json", headers={"X-API-Key": API_KEY})
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        checks = list(CHECKS)
        if (operation.method.upper(), operation.path) not in SUBMISSIONS:
            checks.append(positive_data_acceptance)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(case: Case) -> None:
                case.call_and_validate(base_url=served, headers={"X-API-Key": API_KEY}, checks=checks, timeout=60)

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (AssertionError, ExceptionGroup) as e:  # every operation is run; all failures are reported together
                failures.append(f"{operation.label} ({mode.value}): {e}")
    assert not failures, "\n\n".join(failures)
