"""Models, LoRAs and image inputs through the API, with a real gateway and worker."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx
import pytest
from PIL import Image

from tests.conftest import Gateway, WorkerProcess, client_for, wait_for
from worker.models import build_tiny_lora

SMALL = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder: `ink` for tiny (SD 1.x), `wide` for tiny-sd2."""
    folder = tmp_path_factory.mktemp("loras")
    build_tiny_lora(folder / "ink.safetensors", "tiny", seed=1)
    build_tiny_lora(folder / "wide.safetensors", "tiny-sd2", seed=2)
    return folder


@pytest.fixture
def model_env(env: dict[str, str], loras: Path) -> dict[str, str]:
    """The tiny model with a LoRA folder."""
    return {**env, "DQ_LORAS": str(loras)}


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    """A plain PNG."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


def image_of(client: httpx.Client, gateway: Gateway, job: dict[str, object]) -> Image.Image:
    """A finished job's first image."""
    url = job["outputs"][0]["url"]  # type: ignore[index]
    return Image.open(io.BytesIO(httpx.get(gateway.url + url).content)).convert("RGB")


def test_models_lists_each_model_its_loras_defaults_and_state(
    model_env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    with client_for(gateway_factory(model_env)) as client:
        listed = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in listed] == ["tiny"]
    tiny = listed[0]
    assert tiny["default"] is True
    assert tiny["loras"] == ["ink"]  # `wide` is of another family
    assert tiny["tasks"] == ["txt2img", "img2img", "inpaint"]
    assert tiny["state"] == {
        "workers_serving": 0,
        "workers_starting": 0,
        "queued_images": 0,
        "running_images": 0,
        "images_per_s": None,
    }


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"model": "sdxl"}, "model", "unknown_model"),
        ({"loras": [{"name": "nope"}]}, "loras[0].name", "unknown_lora"),
        ({"loras": [{"name": "wide"}]}, "loras[0].name", "lora_family_mismatch"),
        ({"task": "img2img"}, "image", "validation_error"),
        ({"task": "inpaint", "image": "data:image/png;base64,AA=="}, "mask", "validation_error"),
        ({"image": "data:image/png;base64,AA=="}, "image", "validation_error"),
    ],
)
def test_a_request_the_catalog_refuses_is_a_422_naming_the_field(
    model_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    change: dict[str, object],
    field: str,
    code: str,
) -> None:
    with client_for(gateway_factory(model_env)) as client:
        reply = client.post("/v1/jobs", json={**SMALL, **change})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert (error["field"], error["code"]) == (field, code)


def test_lora_upload_data_uri_and_defaults_run_end_to_end(
    model_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    gateway = gateway_factory(model_env)
    worker_factory(model_env)
    with client_for(gateway) as client:
        base = client.post("/v1/jobs", json=SMALL).json()
        lora = client.post("/v1/jobs", json={**SMALL, "loras": [{"name": "ink", "scale": 1}]})
        upload = client.post("/v1/uploads", json={"content_type": "image/png"}).json()
        put = httpx.put(
            gateway.url + upload["url"], content=png((200, 30, 30)), headers=upload["headers"]
        )
        assert put.status_code == 204, put.text
        edit = client.post(
            "/v1/jobs", json={**SMALL, "task": "img2img", "image": upload["ref"], "strength": 0.5}
        ).json()
        inline = "data:image/png;base64," + base64.b64encode(png((30, 200, 30))).decode()
        mask = "data:image/png;base64," + base64.b64encode(png((255, 255, 255))).decode()
        paint = client.post(
            "/v1/jobs", json={**SMALL, "task": "inpaint", "image": inline, "mask": mask}
        ).json()
        defaults = client.post("/v1/jobs", json={"prompt": "defaults"}).json()
        jobs = {
            name: wait_for(client, job["id"], timeout=120)
            for name, job in (
                ("base", base),
                ("lora", lora.json()),
                ("edit", edit),
                ("paint", paint),
            )
        }
        assert {name: j["status"] for name, j in jobs.items()} == dict.fromkeys(jobs, "succeeded")
        assert jobs["lora"]["request"]["loras"] == [{"name": "ink", "scale": 1.0}]
        assert jobs["edit"]["request"]["strength"] == 0.5
        assert image_of(client, gateway, jobs["base"]) != image_of(client, gateway, jobs["lora"])
        # The model's defaults fill what a request leaves out, and the job says what ran.
        assert (defaults["request"]["width"], defaults["request"]["steps"]) == (64, 10)
        assert client.delete(f"/v1/jobs/{defaults['id']}").status_code == 204
        # A job's inputs are kept beside its images, and go with them when it is deleted.
        images = Path(url2pathname(urlparse(model_env["DQ_STORAGE_URL"]).path))
        folder = images / jobs["paint"]["id"]
        assert {p.name for p in folder.iterdir()} >= {"input-image.png", "input-mask.png", "0.png"}
        assert client.delete(f"/v1/jobs/{jobs['paint']['id']}").status_code == 204
        assert not folder.exists()


def test_a_bad_input_fails_its_job_alone(
    model_env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    gateway = gateway_factory(model_env)
    worker_factory(model_env)
    with client_for(gateway) as client:
        not_image = "data:image/png;base64," + base64.b64encode(b"<html>no</html>").decode()
        bad = client.post("/v1/jobs", json={**SMALL, "task": "img2img", "image": not_image}).json()
        private = client.post(
            "/v1/jobs",
            json={**SMALL, "task": "img2img", "image": "https://127.0.0.1:9/x.png"},
        ).json()
        good = client.post("/v1/jobs", json=SMALL).json()
        done = [wait_for(client, j["id"], timeout=120) for j in (bad, private, good)]
    assert [d["status"] for d in done] == ["failed", "failed", "succeeded"]
    assert done[0]["error"]["code"] == "input_not_image"
    assert done[1]["error"]["code"] == "input_unsafe_url"  # a private address: never fetched
