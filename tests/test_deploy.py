"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import importlib.util
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    """The compose file, parsed."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_redis_keeps_an_append_only_file_and_never_evicts() -> None:
    command = " ".join(compose()["services"]["redis"]["command"].split())
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command


def test_the_gateway_refuses_to_start_without_keys() -> None:
    env = compose()["services"]["api"]["environment"]
    assert env["DQ_API_KEYS"].startswith("${DQ_API_KEYS:?")


def test_every_service_waits_for_a_healthy_redis() -> None:
    services = compose()["services"]
    for name in ("api", "worker", "webhooks", "scaler"):
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name


def test_workers_get_a_gpu_and_time_to_drain() -> None:
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    minutes = int(re.fullmatch(r"(\d+)m", worker["stop_grace_period"]).group(1))  # type: ignore[union-attr]
    # As long as the scaler waits for a drain: a worker stopped sooner is killed mid-batch.
    assert minutes * 60 >= Settings().scaler_drain_timeout_s


def test_service_commands_name_modules_that_exist() -> None:
    for name, service in compose()["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, name


def test_the_dockerfile_builds_both_targets_the_compose_file_uses() -> None:
    targets = set(re.findall(r"^FROM .* AS (\w+)$", (ROOT / "Dockerfile").read_text(), re.M))
    used = {s["build"]["target"] for s in compose()["services"].values() if "build" in s}
    assert used <= targets
    assert used == {"api", "worker"}


def test_the_compose_file_follows_the_compose_specification() -> None:
    """The compose spec's own JSON schema (as check-jsonschema ships it): unknown keys fail."""
    pytest.importorskip("check_jsonschema")
    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    broken = compose()
    broken["services"]["grafana"]["restrat"] = "always"
    assert list(validator.iter_errors(broken))


def mounted(service: dict[str, Any], inside: str) -> Path:
    """The file of this repository a service sees at `inside`, through its bind mounts."""
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./") and (inside == target or inside.startswith(f"{target}/")):
            return ROOT / source / inside.removeprefix(target).lstrip("/")
    raise AssertionError(f"nothing of the repository is mounted at {inside}")


def pinned(image: str) -> bool:
    _, _, tag = image.rpartition(":")
    return bool(re.fullmatch(r"v?\d+\.\d+\.\d+", tag))


def test_prometheus_scrapes_every_gateway_and_loads_the_alert_rules() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert pinned(prometheus["image"]), prometheus["image"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = mounted(prometheus, flag.removeprefix("--config.file="))
    config = yaml.safe_load(config_path.read_text())
    for rules in config["rule_files"]:
        assert (config_path.parent / rules).is_file(), rules
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "dq-gateway"  # the name the alert rules expect
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    (name,) = discovery["names"]
    assert name in services
    assert services[name]["ports"] == ["${DQ_PORT:-8000}:" + str(discovery["port"])]


def test_grafana_is_provisioned_with_the_dashboard_and_the_compose_prometheus() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    assert pinned(grafana["image"]), grafana["image"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "9090" in services["prometheus"]["ports"][0]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "diffusion-queue.yml").read_text())[
        "providers"
    ]
    dashboards = mounted(grafana, provider["options"]["path"])
    assert [p.name for p in dashboards.glob("*.json")] == ["diffusion-queue.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted(grafana, home).is_file()


def test_monitoring_listens_on_loopback_only() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        (port,) = services[name]["ports"]
        assert port.startswith("127.0.0.1:"), name
