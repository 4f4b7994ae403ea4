"""`dq submit|jobs|show|cancel|get|top` against a real `dq up`, in a real terminal at times."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from core.embedded import free_port
from dq_client import Client
from dq_client.display import queue_view
from tests.client_parts import KEY, TINY, DqUp
from tests.conftest import ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@pytest.fixture(scope="module")
def dq(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[DqUp]:
    """One `dq up` for the module, writing progress often."""
    up = DqUp(tmp_path_factory.mktemp("dq"), model_cache, DQ_PROGRESS_INTERVAL_S="0.05")
    try:
        yield up.wait_ready()
    finally:
        up.stop()


@pytest.fixture
def client(dq: DqUp) -> Iterator[Client]:
    """Alice's SDK client, to set the scene."""
    with Client(dq.url, KEY) as c:
        yield c


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any DQ_ settings, plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DQ_")} | extra


def dq_cli(
    dq: DqUp, *args: str, key: str = KEY, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`dq ARGS --url … --key …`, output captured."""
    argv = [sys.executable, "-m", "core.cli", *args, "--url", dq.url, "--key", key]
    return subprocess.run(
        argv, cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=120
    )


def in_terminal(
    argv: list[str],
    env: dict[str, str],
    react: tuple[str, Callable[[subprocess.Popen[bytes]], None]] | None = None,
    timeout: float = 120,
) -> tuple[int, str]:
    """Run `argv` on a pseudo-terminal of 120 columns; its exit code and all it drew.

    With `react` (text, action), the action is taken once the text has been drawn.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        # As from a terminal: a suite started in the background (`… &`) has SIGINT ignored, and
        # a Python started that way would never see Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
                if react and react[0] in ANSI.sub("", drawn.decode(errors="replace")):
                    react[1](proc)
                    react = None
            elif proc.poll() is not None:
                break
        text = ANSI.sub("", drawn.decode(errors="replace"))
        try:
            return proc.wait(30), text
        except subprocess.TimeoutExpired:
            waited = f"{react[0]!r} never drawn" if react else "it did not exit"
            raise AssertionError(f"{waited}; the last it drew:\n{text[-3000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_submit_wait_shows_increasing_steps_in_a_terminal(dq: DqUp, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "core.cli", "submit", "a lighthouse at dusk"]
    argv += ["--size", "64x64", "--steps", "40", "--n", "2", "--wait", "--out", str(tmp_path)]
    env = clean_env(DQ_URL=dq.url, DQ_API_KEY=KEY, TERM="xterm-256color")
    code, drawn = in_terminal(argv, env)
    assert code == 0, drawn
    steps = [int(s) for s in re.findall(r"\b(\d+)/40\b", drawn)]
    assert len(set(steps)) >= 4, drawn
    assert steps == sorted(steps), drawn
    assert steps[-1] == 40
    files = sorted(p.name for p in tmp_path.iterdir())
    job_id = files[0].rsplit("-", 1)[0]
    assert files == [f"{job_id}-0.png", f"{job_id}-1.png"]
    assert f"{job_id} succeeded" in drawn
    assert str(tmp_path / files[1]) in drawn.replace("\r\n", "")


def test_a_queued_job_shows_its_place_in_the_queue(
    dq: DqUp, client: Client, tmp_path: Path
) -> None:
    ahead = client.submit("ahead", **{**TINY, "steps": 150})  # "behind" waits for it
    argv = [sys.executable, "-m", "core.cli", "submit", "behind", "--size", "64x64"]
    argv += ["--steps", "2", "--out", str(tmp_path), "--url", dq.url, "--key", KEY]
    code, drawn = in_terminal(
        argv, clean_env(TERM="xterm-256color"), ("position", lambda _: client.cancel(ahead))
    )
    assert code == 0, drawn
    assert re.search(r"queued .*position \d+", drawn), drawn
    assert "succeeded" in drawn


def test_json_output_parses(dq: DqUp, client: Client, tmp_path: Path) -> None:
    out = dq_cli(dq, "submit", "two", "--size", "64x64", "--steps", "2", "--n", "2", "--json")
    assert out.returncode == 0, out.stderr
    queued = json.loads(out.stdout)
    assert (queued["status"], queued["request"]["num_images"]) == ("queued", 2)
    got = dq_cli(dq, "get", queued["id"], "--out", str(tmp_path), "--json")
    assert got.returncode == 0, got.stderr
    done = json.loads(got.stdout)
    assert (done["id"], done["status"]) == (queued["id"], "succeeded")
    assert [Path(f).name for f in done["files"]] == [f"{queued['id']}-{i}.png" for i in (0, 1)]
    assert all(Path(f).stat().st_size > 0 for f in done["files"])
    shown = json.loads(dq_cli(dq, "show", queued["id"], "--json").stdout)
    assert (shown["id"], len(shown["outputs"])) == (queued["id"], 2)
    listed = json.loads(dq_cli(dq, "jobs", "--json", "--limit", "2").stdout)
    assert listed[0]["id"] == queued["id"]
    assert len(listed) == 2
    succeeded = json.loads(dq_cli(dq, "jobs", "--json", "--status", "succeeded").stdout)
    assert {j["status"] for j in succeeded} == {"succeeded"}
    queue = json.loads(dq_cli(dq, "top", "--json").stdout)
    assert queue["workers"] >= 1
    refused = dq_cli(dq, "cancel", queued["id"], "--json")
    assert refused.returncode == 6
    assert json.loads(refused.stdout)["error"]["code"] == "already_finished"


def test_human_output(dq: DqUp, client: Client) -> None:
    job = client.wait(client.submit("shown to people", **TINY))
    shown = dq_cli(dq, "show", job.id)
    assert shown.returncode == 0, shown.stderr
    for text in (
        job.id,
        "succeeded",
        "shown to people",
        "64x64",
        "image 0",
        job.outputs[0].url.split("?")[0],
    ):
        assert text in shown.stdout, shown.stdout
    listed = dq_cli(dq, "jobs", "--limit", "5")
    assert job.id in listed.stdout
    top = dq_cli(dq, "top", "--once")
    assert top.returncode == 0, top.stderr
    for text in ("queued", "running", "workers", "images/s", "scaler's last decision", "desired"):
        assert text in top.stdout, top.stdout


def test_exit_codes(dq: DqUp, client: Client, tmp_path: Path) -> None:
    finished = client.wait(client.submit("done", **TINY))
    canceled = client.cancel(client.submit("canceled", **{**TINY, "steps": 100}))
    unreachable = f"http://127.0.0.1:{free_port()}"
    cases: list[tuple[list[str], dict[str, Any], int]] = [
        (["show", finished.id], {}, 0),
        (["get", canceled.id, "--out", str(tmp_path)], {}, 1),
        (["submit", "odd", "--size", "65x64"], {}, 2),  # the server's 422
        (["submit", "odd", "--size", "big"], {}, 2),  # argparse
        (["submit", "x", "--image", str(tmp_path / "missing.png")], {}, 2),
        (["submit", "x" * 100_000], {}, 2),  # 413
        (["jobs", "--retry-for", "1"], {"url": unreachable}, 3),
        (["jobs"], {"key": "wrong"}, 4),
        (["show", "job_nope"], {}, 5),
        (["cancel", finished.id], {}, 6),
        (
            ["submit", "slow", "--size", "64x64", "--steps", "150", "--timeout", "0.5", "--wait"],
            {},
            7,
        ),
    ]
    codes = []
    for args, how, _ in cases:
        argv = [sys.executable, "-m", "core.cli", *args]
        argv += ["--url", how.get("url", dq.url), "--key", how.get("key", KEY)]
        run = subprocess.run(argv, cwd=ROOT, env=clean_env(), capture_output=True, timeout=120)
        codes.append(run.returncode)
    assert codes == [code for _, _, code in cases]
    for job in client.list("queued"):
        client.cancel(job)
    for job in client.list("running"):
        client.cancel(job)


def test_help_documents_the_exit_codes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "submit", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    for line in ("exit codes:", "1  the job failed", "3  the server could not be reached"):
        assert line in out.stdout


def test_dq_top_redraws_until_ctrl_c(dq: DqUp) -> None:
    argv = [sys.executable, "-m", "core.cli", "top", "--interval", "0.2"]
    argv += ["--url", dq.url, "--key", KEY]
    ctrl_c = ("desired", lambda proc: os.killpg(proc.pid, signal.SIGINT))
    code, drawn = in_terminal(argv, clean_env(TERM="xterm-256color"), ctrl_c)
    assert code == 130
    assert "scaler's last decision" in drawn
    assert "interrupted" in drawn


def test_top_renders_whatever_the_queue_returns() -> None:
    future = {
        "queued": 5,
        "running": 2,
        "by_model": {"sdxl": {"high": 1, "normal": 3}, "tiny": {"low": 1}},
        "by_priority": {"high": 1, "normal": 3, "low": 1},
        "workers": [
            {"name": "w1", "state": "busy", "model": "sdxl", "images_per_s": 1.25},
            {"name": "w2", "state": "idle", "model": "tiny"},
        ],
        "scaler": {"current": 2, "desired": 3, "reason": "backlog growing"},
        "models": ["sdxl", "tiny"],
    }
    console = Console(record=True, width=120)
    console.print(queue_view(future, "title"))
    text = console.export_text()
    for expected in (
        "by model",
        "sdxl",
        "by priority",
        "busy",
        "idle",
        "1.25",
        "backlog growing",
        'models: ["sdxl","tiny"]',
    ):
        assert expected in text, text
