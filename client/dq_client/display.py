"""How the command line shows jobs and the queue in a terminal (rich renderables)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from dq_client.models import Job, JobStatus

STYLES: dict[str, str] = {
    JobStatus.QUEUED: "yellow",
    JobStatus.RUNNING: "cyan",
    JobStatus.SUCCEEDED: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELED: "magenta",
}

# Names of the queue's fields as `dq top` shows them; others are shown as they are called.
LABELS = {
    "images_per_s": "images/s",
    "eta_s": "ETA (s)",
    "scaler": "scaler's last decision",
}


def status_text(status: str) -> Text:
    """A status in its colour."""
    return Text(status, style=STYLES.get(status, ""))


def seconds(value: float | None) -> str:
    """A duration for people."""
    return "—" if value is None else f"{value:.1f} s"


def when(value: datetime | None) -> str:
    """A timestamp in local time."""
    return "—" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def cell(value: Any) -> str:
    """Any JSON value in one table cell."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def label(name: str) -> str:
    """A field's name for people."""
    return LABELS.get(name, name.replace("_", " "))


class ProgressView:
    """One job's live progress bar: queue position and ETA while queued, steps while running."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=10,
        )
        self.task = self.progress.add_task("submitted", total=None, note="")

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def show(self, job: Job) -> None:
        """Draw the job as it is now."""
        if job.status == JobStatus.RUNNING and job.progress is not None:
            step, total = job.progress.step, job.progress.total_steps
            self.progress.update(
                self.task, description="running", total=total, completed=step, note="steps"
            )
        elif job.status == JobStatus.QUEUED and job.queue is not None:
            eta = "" if job.queue.eta_s is None else f" · ETA {job.queue.eta_s:.1f} s"
            note = f"position {job.queue.position}{eta}"
            self.progress.update(self.task, description="queued", total=None, note=note)
        elif job.succeeded:
            done = self.progress.tasks[0].total or float(job.request.steps)
            self.progress.update(
                self.task, description="succeeded", total=done, completed=done, note=""
            )
        else:
            self.progress.update(self.task, description=job.status, note="")


def job_details(job: Job) -> Table:
    """Everything about one job, as key/value rows (its image URLs, too long, go below)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    req = job.request
    rows: list[tuple[str, Any]] = [
        ("id", job.id),
        ("status", status_text(job.status)),
        ("prompt", req.prompt),
        ("negative prompt", req.negative_prompt),
        ("size", f"{req.width}x{req.height}"),
        ("steps", req.steps),
        ("guidance", req.guidance_scale),
        ("seed", req.seed),
        ("images", req.num_images),
        ("format", req.output_format),
        *((label(k), cell(v)) for k, v in req.extra.items()),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
    ]
    if job.progress is not None:
        rows.append(("progress", f"{job.progress.step}/{job.progress.total_steps} steps"))
    if job.queue is not None:
        rows.append(("queue", f"position {job.queue.position}, ETA {seconds(job.queue.eta_s)}"))
    if job.error is not None:
        rows.append(("error", Text(f"{job.error.message} ({job.error.code})", style="red")))
    if job.terminal:
        m = job.metrics
        rows.append(("queued / ran", f"{seconds(m.queue_s)} / {seconds(m.run_s)}"))
        rows.append(("batch size, attempts", f"{cell(m.batch_size)}, {m.attempts}"))
    rows.extend((f"image {i}", f"seed {o.seed}") for i, o in enumerate(job.outputs))
    for name, value in rows:
        if value is not None:
            grid.add_row(name, value if isinstance(value, Text) else str(value))
    return grid


def jobs_table(jobs: Iterable[Job]) -> Table:
    """Jobs, one per row; only the prompt is shortened to fit."""
    table = Table(box=None, header_style="bold")
    for column in ("id", "status", "created", "size", "steps", "n"):
        table.add_column(column, no_wrap=True)
    # Wrappable as a column, so a narrow terminal shrinks it first; one line as a cell.
    table.add_column("prompt", min_width=10, max_width=60)
    for job in jobs:
        req = job.request
        table.columns[0].min_width = max(table.columns[0].min_width or 0, len(job.id))
        table.add_row(
            job.id,
            status_text(job.status),
            "—" if job.created_at is None else job.created_at.astimezone().strftime("%m-%d %H:%M"),
            f"{req.width}x{req.height}",
            str(req.steps),
            str(req.num_images),
            Text(req.prompt, no_wrap=True, overflow="ellipsis"),
        )
    return table


def _mapping(name: str, data: dict[str, Any]) -> Table:
    """A mapping as a table: rows of sub-mappings (depth per model, …) or key/value pairs."""
    table = Table(title=label(name), title_justify="left", box=None, header_style="bold")
    if data and all(isinstance(v, dict) for v in data.values()):
        columns = list(dict.fromkeys(k for v in data.values() for k in v))
        table.add_column("")
        for column in columns:
            table.add_column(label(column), justify="right")
        for key, value in data.items():
            table.add_row(key, *(cell(value.get(c)) for c in columns))
        return table
    table.add_column("")
    table.add_column("")
    table.show_header = False
    for key, value in data.items():
        table.add_row(label(key), cell(value))
    return table


def _rows(name: str, rows: list[dict[str, Any]]) -> Table:
    """A list of objects (workers, …) as a table with a column per field."""
    table = Table(title=label(name), title_justify="left", box=None, header_style="bold")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        table.add_column(label(column))
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in columns))
    return table


def queue_view(data: dict[str, Any], title: str, problem: str | None = None) -> Panel:
    """`GET /v1/queue` as a screen, whatever fields it has: numbers first, then each table."""
    numbers = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
    summary = Table(box=None, header_style="bold")
    for key in numbers:
        summary.add_column(label(key), justify="right")
    summary.add_row(*(cell(v) for v in numbers.values()))
    parts: list[RenderableType] = [summary]
    for key, value in data.items():
        if isinstance(value, dict):
            parts.append(_mapping(key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            parts.append(_rows(key, value))
        elif isinstance(value, list):
            parts.append(Text(f"{label(key)}: {cell(value)}"))
    if problem:
        parts.append(Text(problem, style="red"))
    return Panel(Group(*parts), title=title, title_align="left")
