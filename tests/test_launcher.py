"""What `dq up` prints: the status block, and its children's lines, prefixed and concise."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from core.catalog import Catalog
from core.console import Console
from core.errors import ConfigError
from core.launcher import Launch, check_port, child_env, status_block
from core.settings import Settings

T = "2026-12-01 22:49:05,080"

# (child, line written, line shown without --verbose or None)
CONCISE = [
    (
        "scaler",
        f"{T} INFO scaler.loop scale up 0 -> 1: adding 1",
        "22:49:05 scaler   scale up 0 -> 1: adding 1",
    ),
    (
        "scaler",
        f"{T} INFO worker.runner worker w1 ready (model tiny)",
        "22:49:05 worker   worker w1 ready (model tiny)",
    ),
    ("scaler", f"{T} INFO celery.apps.worker w1 ready.", None),
    (
        "scaler",
        f"{T} INFO celery.worker.consumer.connection Connected to redis://:**@127.0.0.1:1/0",
        None,
    ),
    ("scaler", f"{T} WARNING celery.redirected Loading weights: 100%|##########| 84/84", None),
    (
        "scaler",
        f"{T} WARNING celery.redirected ValueError: bad shape",
        "22:49:05 worker   warning: ValueError: bad shape",
    ),
    (
        "scaler",
        f"{T} WARNING py.warnings x.py:23: FutureWarning: `torch_dtype` is deprecated",
        None,
    ),
    ("scaler", "  deprecate(...)", None),  # the rest of a hidden record
    (
        "scaler",
        f"{T} INFO scaler.process draining worker w1",
        "22:49:05 scaler   draining worker w1",
    ),
    ("scaler", "", None),
    ("scaler", "worker: Warm shutdown (MainProcess)", None),  # Celery's print after an INFO line
    (
        "gateway",
        f"{T} WARNING api.watch job change subscription lost; resubscribing",
        "22:49:05 gateway  warning: job change subscription lost; resubscribing",
    ),
    (
        "gateway",
        f"{T} ERROR api.errors internal error on GET /v1/jobs: KeyError at routes.py:1",
        "22:49:05 gateway  error: internal error on GET /v1/jobs: KeyError at routes.py:1",
    ),
    (
        "gateway",
        "Traceback (most recent call last):",
        "         gateway  Traceback (most recent call last):",
    ),
    ("gateway", '  File "x.py", line 1, in f', '         gateway    File "x.py", line 1, in f'),
    ("webhooks", f"{T} INFO kombu.mixins Connected", None),
    (
        "webhooks",
        f"{T} CRITICAL celery.worker Unrecoverable error: OSError",
        "22:49:05 webhooks critical: Unrecoverable error: OSError",
    ),
    (
        "dq",
        f"{T} INFO dq stopping: running batches finish first",
        "22:49:05 dq       stopping: running batches finish first",
    ),
]


def console(*, verbose: bool = False) -> tuple[Console, io.StringIO]:
    """A console writing to a string."""
    out = io.StringIO()
    return Console(out, verbose=verbose, color=False), out


def test_concise_lines_say_who_wrote_them_and_leave_library_chatter_out() -> None:
    con, _ = console()
    assert [con.render(child, line) for child, line, _ in CONCISE] == [s for *_, s in CONCISE]


def test_verbose_shows_every_line_as_written_with_its_writer() -> None:
    con, _ = console(verbose=True)
    shown = [con.render(child, line) for child, line, _ in CONCISE]
    assert shown[2] == f"worker   {T} INFO celery.apps.worker w1 ready."
    assert shown[10] == "scaler   worker: Warm shutdown (MainProcess)"
    assert None not in shown


def test_a_child_that_fails_before_it_logs_is_shown() -> None:
    con, out = console()
    con.line("gateway", "dq api: DQ_SECRET_KEY is not set: …")
    con.line("worker", "Traceback (most recent call last):")
    con.line("worker", "ModuleNotFoundError: No module named 'torch'")
    assert out.getvalue().splitlines() == [
        "         gateway  dq api: DQ_SECRET_KEY is not set: …",
        "         worker   Traceback (most recent call last):",
        "         worker   ModuleNotFoundError: No module named 'torch'",
    ]


def test_the_relay_copies_a_pipe_line_by_line() -> None:
    con, out = console()
    pipe = io.BytesIO(f"{T} INFO api.app one\n{T} INFO celery.x two\n{T} INFO api.app 3\n".encode())
    con.relay("gateway", pipe).join(5)
    assert out.getvalue() == "22:49:05 gateway  one\n22:49:05 gateway  3\n"


def test_lines_held_back_come_after_the_status_block() -> None:
    con, out = console()
    con.hold()
    con.line("scaler", f"{T} INFO scaler.loop took the scaler lock")
    assert out.getvalue() == ""
    con.release(["diffusion-queue is running"])
    con.line("scaler", f"{T} INFO scaler.loop scale up")
    assert out.getvalue().splitlines() == [
        "diffusion-queue is running",
        "22:49:05 scaler   took the scaler lock",
        "22:49:05 scaler   scale up",
    ]


def settings(tmp_path: Path, **fields: object) -> Settings:
    """Settings as `dq up` reads them, with no environment."""
    return Settings(data_dir=tmp_path, **fields)  # type: ignore[arg-type]


def test_the_status_block_says_the_tiny_model_makes_noise_and_where_real_ones_are(
    tmp_path: Path,
) -> None:
    ours = settings(tmp_path)
    block = "\n".join(status_block(ours, Launch(), Catalog.from_settings(ours), tmp_path))
    assert "diffusion-queue is running" in block
    assert "web page  http://127.0.0.1:8000/" in block
    assert "reference: http://127.0.0.1:8000/docs" in block
    assert "tiny: random weights, so every image is noise" in block
    assert 'README.md, "Real models, LoRAs and image inputs"' in block
    assert "the API is open to anyone who reaches 127.0.0.1" in block
    assert f"data      {tmp_path}" in block
    assert "stop      Ctrl-C" in block


def test_the_status_block_names_a_real_model_and_the_keys(tmp_path: Path) -> None:
    keys = "alice:key-alice-0123456789abcdef,bob:key-bob-0123456789abcdefgh"
    ours = settings(tmp_path, model="stabilityai/sdxl-turbo", api_keys=keys)
    launch = Launch(port=8001, min_workers=0, max_workers=2)
    block = "\n".join(status_block(ours, launch, Catalog.from_settings(ours), tmp_path))
    assert "model     stabilityai-sdxl-turbo: stabilityai/sdxl-turbo" in block
    assert "noise" not in block
    assert "API keys  2 keys (DQ_API_KEYS)" in block
    assert "workers   0 to 2, as the queue needs" in block
    assert '-H "Authorization: Bearer $KEY"' in block


def test_children_are_told_to_skip_celerys_root_warning_unless_verbose(tmp_path: Path) -> None:
    ours = settings(tmp_path)
    quiet = child_env(ours, Launch(), tmp_path)
    assert quiet["PYTHONWARNINGS"].startswith("ignore:You're running the worker with superuser")
    assert quiet["PYTHONUNBUFFERED"] == "1"
    assert quiet["DQ_PUBLIC_URL"] == "http://127.0.0.1:8000"
    verbose = child_env(ours, Launch(verbose=True), tmp_path)
    assert "superuser" not in verbose.get("PYTHONWARNINGS", "")


def test_a_port_in_use_is_refused_with_what_to_do() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{port} is in use .*--port {port + 1}"):
            check_port("127.0.0.1", port)
