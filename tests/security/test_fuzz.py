"""schemathesis against the platform's own OpenAPI document: valid and invalid input on every operation,
never a 5xx, and every response in the shape the document promises. Example counts are bounded so the whole
run takes seconds; they are printed with the result."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from adaptery.api.app import create_app
from tests.integration.conftest import Running

EXAMPLES = {GenerationMode.POSITIVE: 4, GenerationMode.NEGATIVE: 3}
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # service logic: one backend is enough
def test_fuzz_every_operation_of_the_openapi_document(platform_running: Running):
    # The platform is already running under the fixture's client; this app only shares it.
    app = create_app(platform_running.platform, manage_lifecycle=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {platform_running.first.api_key}"}  # an owner and platform admin
    statuses: Counter[int] = Counter()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode, examples in EXAMPLES.items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: schemathesis.Case) -> None:
                response = case.call(headers=headers)
                statuses[response.status_code] += 1
                case.validate_response(response, checks=CHECKS)

            try:
                fuzz()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without inputs has nothing to get wrong
    calls = sum(statuses.values())
    print(f"schemathesis: {operations} operations, {calls} requests, statuses {dict(sorted(statuses.items()))}")
    assert operations >= 50 and calls >= operations * 2
