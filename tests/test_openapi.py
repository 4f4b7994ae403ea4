"""/openapi.json is complete enough that a generated client runs a job against the real thing."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.routing import APIRoute
from PIL import Image

from api.app import create_app
from core.jobs import JobCreate
from tests.conftest import ALICE_KEY, Gateway, WorkerProcess, settings_from

GENERATOR = Path(sys.executable).parent / "openapi-python-client"
# The generator knows JSON, text and application/octet-stream bodies; images are bytes to it too.
GENERATOR_CONFIG = """\
post_hooks: []
content_type_overrides:
  image/png: application/octet-stream
  image/jpeg: application/octet-stream
  image/webp: application/octet-stream
"""
UNDOCUMENTED = {"/", "/docs", "/metrics", "/openapi.json", "/page/{name}"}  # pages, Prometheus
GUARDED_ERRORS = {"401", "429", "503"}


@pytest.fixture
def document(env: dict[str, str]) -> dict[str, Any]:
    """The document, as the app builds it (no server needed)."""
    schema: dict[str, Any] = create_app(settings_from(env)).openapi()
    return schema


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every documented route."""
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def test_every_route_is_documented_with_a_summary_a_tag_and_an_id(env: dict[str, str]) -> None:
    app = create_app(settings_from(env))
    documented = {
        (method.upper(), path)
        for path, methods in app.openapi()["paths"].items()
        for method in methods
    }
    routes = {
        (method, route.path.replace(":path}", "}"))
        for route in app.routes
        if isinstance(route, APIRoute) and route.path not in UNDOCUMENTED
        for method in route.methods
    }
    assert routes - documented == set()
    for method, path, operation in operations(app.openapi()):
        where = f"{method} {path}"
        assert operation.get("summary"), where
        assert operation.get("tags"), where
        assert operation.get("operationId"), where


def test_errors_are_the_envelope_and_guarded_routes_say_so(document: dict[str, Any]) -> None:
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert document["security"] == [{"bearerAuth": []}]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for method, path, operation in operations(document):
        answers = operation["responses"]
        errors = {code: answer for code, answer in answers.items() if code >= "400"}
        for code, answer in errors.items():
            schema = answer["content"]["application/json"]["schema"]
            assert schema == envelope, f"{method} {path} {code}"
        open_route = operation.get("security") == []
        assert open_route or set(errors) >= GUARDED_ERRORS, f"{method} {path}"
        if "401" in errors:
            assert "WWW-Authenticate" in answers["401"]["headers"]
        if "429" in errors:
            assert "Retry-After" in answers["429"]["headers"]
    assert {path for _, path, op in operations(document) if op.get("security") == []} == {
        "/healthz",
        "/readyz",
        "/v1/files/{key}",
        "/v1/uploads/{key}",
    }


def test_the_submit_examples_are_valid_requests(document: dict[str, Any]) -> None:
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    examples = body["examples"]
    assert len(examples) >= 4
    for name, example in examples.items():
        assert JobCreate.model_validate(example["value"]), name  # raises if an example rotted


def test_a_route_added_without_errors_gets_the_guarded_ones(env: dict[str, str]) -> None:
    app = create_app(settings_from(env))

    @app.get("/v1/admin/queue", tags=["admin"], summary="Depth per model, class and tenant")
    async def admin_queue() -> dict[str, int]:
        return {}

    answers = app.openapi()["paths"]["/v1/admin/queue"]["get"]["responses"]
    assert set(answers) == {"200", "401", "403", "429", "503"}
    assert answers["403"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }


@pytest.fixture
def generated(gateway: Gateway, tmp_path: Path) -> Iterator[ModuleType]:
    """A client package generated from the running gateway's /openapi.json, imported."""
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{gateway.url}/openapi.json").raise_for_status().content)
    config = tmp_path / "generator.yaml"
    config.write_text(GENERATOR_CONFIG)
    out = tmp_path / "gen" / "dq_generated"
    argv = [str(GENERATOR), "generate", "--path", str(spec), "--meta", "none"]
    argv += ["--output-path", str(out), "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every route made it into the client: the generator warns about what it leaves out.
    assert "will not be generated" not in done.stdout + done.stderr
    sys.path.insert(0, str(out.parent))
    try:
        yield importlib.import_module("dq_generated")
    finally:
        sys.path.remove(str(out.parent))
        for name in [n for n in sys.modules if n.split(".")[0] == "dq_generated"]:
            del sys.modules[name]


def part(name: str) -> Any:
    """A module of the generated package."""
    return importlib.import_module(f"dq_generated.{name}")


def test_a_generated_client_runs_a_job_end_to_end(
    env: dict[str, str],
    gateway: Gateway,
    worker_factory: Callable[..., WorkerProcess],
    generated: ModuleType,
) -> None:
    submit, get_job = part("api.jobs.submit_job"), part("api.jobs.get_job")
    inputs, get_file = part("api.inputs.new_upload"), part("api.files.get_file")
    models = part("models")
    worker_factory(env)
    client = generated.AuthenticatedClient(base_url=gateway.url, token=ALICE_KEY, timeout=60)
    body = models.JobCreate(prompt="a lighthouse at dusk", width=64, height=64, steps=2, seed=7)

    job = submit.sync(client=client, body=body)
    assert isinstance(job, models.Job), job
    assert job.status == models.JobStatus.QUEUED
    done = get_job.sync(job.id, client=client, wait=30)
    assert isinstance(done, models.Job)
    assert (done.status, done.request.seed, len(done.outputs)) == (models.JobStatus.SUCCEEDED, 7, 1)

    url = urlsplit(done.outputs[0].url)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    key = url.path.removeprefix("/v1/files/")
    image = get_file.sync_detailed(
        key, client=client, expires=int(query["expires"]), sig=query["sig"]
    )
    assert image.status_code == 200
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)

    # An image input the documented way: ask for a place, PUT the bytes there, name it.
    place = inputs.sync(client=client, body=models.UploadAsk(content_type="image/png"))
    assert isinstance(place, models.Upload), place
    put = httpx.request(
        place.method,
        httpx.URL(gateway.url).join(place.url),  # relative when DQ_PUBLIC_URL is unset
        content=image.content,
        headers=place.headers.to_dict(),
    )
    assert put.status_code == 204
    again = models.JobCreate.from_dict(
        {
            "prompt": "the same, in winter",
            "task": "img2img",
            "image": place.ref,
            "strength": 0.5,
            "width": 64,
            "height": 64,
            "steps": 2,
        }
    )
    job = submit.sync(client=client, body=again)
    assert isinstance(job, models.Job), job
    done = get_job.sync(job.id, client=client, wait=30)
    assert isinstance(done, models.Job)
    assert done.status == models.JobStatus.SUCCEEDED, done.error


def test_a_generated_client_reads_errors_as_the_envelope(
    gateway: Gateway, generated: ModuleType
) -> None:
    submit, get_job, list_jobs = (
        part(f"api.jobs.{n}") for n in ("submit_job", "get_job", "list_jobs")
    )
    models = part("models")
    client = generated.AuthenticatedClient(base_url=gateway.url, token=ALICE_KEY)

    refused = submit.sync_detailed(client=client, body=models.JobCreate(prompt="x", steps=0))
    assert refused.status_code == 422
    assert isinstance(refused.parsed, models.ErrorResponse)
    assert (refused.parsed.error.code, refused.parsed.error.field) == ("validation_error", "steps")

    missing = get_job.sync("job_" + "0" * 32, client=client)
    assert isinstance(missing, models.ErrorResponse)
    assert missing.error.code == "not_found"

    anonymous = generated.Client(base_url=gateway.url)
    answer = list_jobs.sync_detailed(client=anonymous)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert isinstance(answer.parsed, models.ErrorResponse)
    assert answer.parsed.error.code == "unauthorized"
