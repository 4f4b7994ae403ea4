"""The machine and software a report was measured on."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

from bench.system import ROOT

PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "celery",
    "redis",
    "fastapi",
    "uvicorn",
    "pydantic",
    "litserve",
    "httpx",
)


class Machine(BaseModel):
    """Hardware, as far as the bench can see it."""

    cpu: str
    cores: int
    memory_gb: float | None
    platform: str
    load_avg_at_start: tuple[float, float, float] | None
    gpu: str | None = None


class Versions(BaseModel):
    """Software versions and the commit measured."""

    python: str
    packages: dict[str, str | None]
    redis_server: str | None
    commit: str | None
    dirty: bool | None


def cpu_name() -> str:
    """The CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(gpu: str | None = None) -> Machine:
    """This machine."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory: float | None = round(pages / 2**30, 1)
    except (ValueError, OSError):
        memory = None
    return Machine(
        cpu=cpu_name(),
        cores=os.cpu_count() or 1,
        memory_gb=memory,
        platform=platform.platform(),
        load_avg_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
        gpu=gpu,
    )


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def versions() -> Versions:
    """Versions of Python, the packages that matter, redis-server and the repo."""
    from core.embedded import redis_binary

    server = _run([redis_binary(), "--version"])
    status = _run(["git", "status", "--porcelain"])
    return Versions(
        python=platform.python_version(),
        packages={p: _version(p) for p in PACKAGES},
        redis_server=server.split(" v=")[1].split()[0] if server and " v=" in server else server,
        commit=_run(["git", "rev-parse", "HEAD"]),
        dirty=None if status is None else bool(status),
    )


def model_hash(cache_dir: Path, model: str) -> str | None:
    """A short hash of the model's configs (not its weights): which architecture was measured."""
    folder = cache_dir / model
    if not (folder / "model_index.json").is_file():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.json")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
