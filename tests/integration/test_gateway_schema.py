"""The gateway's OpenAPI schema is its contract: every request body and the API-key schemes are declared,
/docs works with no internet, and schemathesis, generating valid and invalid requests for every operation
from the schema alone, never gets a 5xx, an undocumented status, or a response that breaks its schema."""

from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from arbiter.gateway.apikeys import KeyStore
from broker.app import all_queues
from tests.integration.arbiter_helpers import fast_settings
from tests.support.gateway import Gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
EXAMPLES = 25   # per operation and mode: 10 operations x 2 modes, ~20 s here
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def settings(redis_url):
    # small limits so that every valid job the fuzzer makes finishes in moments
    return fast_settings(redis_url, sim_time_scale=0.01, max_new_tokens_limit=8, max_steps_limit=4,
                         max_image_side_px=128, max_prompt_chars=200)


@pytest.fixture(scope="module")
def gateway(settings, start_worker, start_beat, client, tmp_path_factory):
    start_worker("llm", concurrency=2)
    start_worker("diffusion", concurrency=2)
    start_beat()
    gw = Gateway(settings, tmp_path_factory.mktemp("schema") / "gateway.log")
    store = KeyStore(client.redis, client.keys)
    every = ["interactive", "standard", "background"]
    key = store.create("fuzz", every, "standard", rate_per_min=0, max_queued=0)
    admin = store.create("fuzz-admin", every, "standard", rate_per_min=0, max_queued=0, admin=True)
    yield gw, {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {admin}"}
    gw.stop()


def test_every_body_and_the_key_schemes_are_in_the_schema(gateway):
    gw, _, _ = gateway
    spec = httpx.get(gw.base + "/openapi.json").json()
    posts = {path: op["post"] for path, op in spec["paths"].items() if "post" in op}
    admin = {p for p in posts if p.startswith("/v1/admin/")}     # operators' controls (admin-scoped keys)
    assert set(posts) - admin == {"/v1/jobs", "/v1/chat/completions", "/v1/images/generations"}
    assert {p.rsplit("/", 1)[1] for p in admin} == {"pause", "drain", "resume", "bump", "reprioritize"}
    for path, op in posts.items():
        assert {"bearer": []} in op["security"], path
        if path in admin:
            continue
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"], path
        assert {"bearer": []} in op["security"], path
    assert spec["components"]["securitySchemes"]["bearer"] == {**spec["components"]["securitySchemes"]["bearer"],
                                                               "type": "http", "scheme": "bearer"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ok = [c for c in op["responses"] if c.startswith("2")]
            assert ok and all(op["responses"][c].get("content") for c in ok), (method, path)


def test_docs_work_offline(gateway):
    """Swagger UI's page loads its script and stylesheet from the gateway itself, not a CDN."""
    gw, _, _ = gateway
    page = httpx.get(gw.base + "/docs").text
    assert "cdn" not in page.lower() and "//" not in page.split("swagger-ui-bundle.js")[0].rsplit('"', 1)[1]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        url = page.split(asset)[0].rsplit('"', 1)[1] + asset
        r = httpx.get(gw.base + url)
        assert r.status_code == 200 and len(r.content) > 10_000, url


def test_schemathesis_finds_no_5xx_on_any_operation(gateway):
    gw, user, admin = gateway
    schema = schemathesis.openapi.from_url(gw.base + "/openapi.json")
    # the admin operations last (with an admin key): a queue they pause or drain must not starve the others
    operations = sorted((result.ok() for result in schema.get_all_operations()),
                        key=lambda op: op.path.startswith("/v1/admin/"))
    assert len(operations) == 17   # 16 paths (6 admin); /v1/jobs/{job_id} has GET and DELETE
    failures: list[str] = []
    statuses: dict[str, Counter] = {}
    for op in operations:
        auth = admin if op.path.startswith("/v1/admin/") else user
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                                 phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def call(case):
                headers = {**(case.headers or {}), **auth}   # noqa: B023 - the fuzzer's own keys are random
                try:
                    response = case.call(base_url=gw.base, headers=headers, timeout=30)
                    statuses.setdefault(op.label, Counter())[response.status_code] += 1   # noqa: B023 - called below, same iteration
                    case.validate_response(response, checks=CHECKS)
                except Exception as exc:
                    failures.append(f"{op.label} [{mode.value}]: {str(exc)[:600]}")   # noqa: B023 - as above
                    raise

            try:
                call()
            except Exception:   # noqa: BLE001, S110 - hypothesis re-raises the shrunk failure; already recorded
                pass
    for queue in all_queues():
        httpx.post(f"{gw.base}/v1/admin/queues/{queue}/resume", headers=admin)   # whatever the fuzzer paused
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    print({label: dict(c) for label, c in statuses.items()})
    assert all(statuses.get(op.label) for op in operations), statuses
    admin_ok = sum(n for label, c in statuses.items() if "/v1/admin/" in label for code, n in c.items() if code < 300)
    assert admin_ok, statuses   # the admin key got through (not 403 everywhere)
    accepted = sum(n for c in statuses.values() for code, n in c.items() if code < 300)
    assert accepted >= 2 * EXAMPLES, statuses   # valid requests got through, not only refusals
    assert gw.proc.poll() is None
