"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml

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
    assert minutes * 60 >= 60


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
