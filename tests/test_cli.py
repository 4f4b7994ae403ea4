"""`dq up` as a user runs it: one command, a working system, Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.embedded import free_port
from core.errors import ConfigError
from core.settings import load_settings
from tests.conftest import ROOT, wait_until


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether a process exists (zombies count as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_dq_up_serves_a_job_and_ctrl_c_stops_everything(tmp_path: Path, model_cache: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DQ_")} | {
        "DQ_DATA_DIR": str(tmp_path / "data"),
        "DQ_MODEL_CACHE": str(model_cache),
        "DQ_CPU_THREADS": "1",
        "DQ_SCALER_INTERVAL_S": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),  # this checkout's code, whatever the venv installed
    }
    dq = shutil.which("dq", path=str(Path(sys.executable).parent)) or "dq"
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [dq, "up", "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        job = None
        while time.monotonic() < deadline:
            try:
                if job is None:
                    body = {"prompt": "hello", "width": 64, "height": 64, "steps": 2}
                    job = httpx.post(f"{base}/v1/jobs", json=body).json()
                job = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
                if job["status"] == "succeeded":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert job is not None
        assert job["status"] == "succeeded", (tmp_path / "up.log").read_text()[-3000:]
        image = httpx.get(job["outputs"][0]["url"])
        assert image.headers["content-type"] == "image/png"
        family = descendants(up.pid)
        assert len(family) >= 4  # redis, gateway, scaler, webhook sender, worker
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
    text = (tmp_path / "up.log").read_text()
    # One status block, said once the gateway answers; then one prefixed line per event.
    assert text.count("diffusion-queue is running") == 1
    assert text.index("diffusion-queue is running") < text.index(" scaler   ")
    assert f"web page  {base}/" in text
    assert "tiny: random weights, so every image is noise" in text
    assert "the API is open to anyone" in text
    assert f"curl -s {base}/v1/jobs" in text
    assert re.search(r"^\d\d:\d\d:\d\d worker   worker .* ready \(model tiny\)$", text, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d worker   ran batch of jobs job_", text, re.M)
    # Not Celery's banner, nor its warning to every worker run as root, nor library chatter.
    for noise in ("[config]", "[queues]", ".> transport:", "superuser", "celery.", "Warning"):
        assert noise not in text, noise
    wait_until(lambda: not [p for p in family if alive(p)], 5, "every process of dq up to exit")


def test_dq_up_will_not_serve_an_open_api_beyond_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    env["DQ_DATA_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "up", "--host", "0.0.0.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "set DQ_API_KEYS" in out.stderr
    assert not (tmp_path / "redis").exists()


def test_bad_settings_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQ_STORAGE_URL", "ftp://somewhere")
    with pytest.raises(ConfigError, match=r"DQ_STORAGE_URL: .*use s3://bucket/prefix or file:///"):
        load_settings()


def test_bad_api_keys_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQ_API_KEYS", "just-a-key")
    with pytest.raises(ConfigError, match="tenant:key"):
        load_settings().tenants()


def test_dq_help_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("up", "api", "worker", "scaler", "bench", "test"):
        assert command in out.stdout
