"""The command line on the SDK: `dq submit`, `jobs`, `show`, `cancel`, `get`, `top`."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import mimetypes
import queue
import sys
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Any

try:
    from rich.console import Console
    from rich.live import Live
except ImportError as e:  # the SDK was installed without the command line's extra
    print("the command line needs rich: pip install 'diffusion-queue-client[cli]'", file=sys.stderr)
    raise SystemExit(2) from e  # as for bad input: nothing was sent

from dq_client import display
from dq_client.client import Client
from dq_client.errors import (
    APIError,
    ConnectionFailed,
    DQError,
    JobFailed,
    WaitTimeout,
)
from dq_client.models import Job, JobStatus
from dq_client.retry import RetryPolicy


class Exit(IntEnum):
    """What `dq`'s exit status tells a script."""

    OK = 0
    JOB_FAILED = 1  # the job failed or was canceled
    BAD_INPUT = 2  # bad arguments, or the server refused the request (400, 413, 422)
    UNREACHABLE = 3  # the server could not be reached, or stayed unavailable (429, 5xx)
    UNAUTHORIZED = 4  # the key is missing or wrong (401, 403)
    NOT_FOUND = 5  # no such job (404)
    CONFLICT = 6  # the job's state forbids it (409: cancel a job that has ended)
    TIMEOUT = 7  # --timeout passed before the job ended
    INTERRUPTED = 130  # Ctrl-C


EXIT_HELP = """exit codes:
  0  done
  1  the job failed or was canceled
  2  bad input: arguments, a file, or a request the server refused (400, 413, 422)
  3  the server could not be reached or stayed unavailable (connection, 429, 5xx)
  4  the API key is missing or wrong (401, 403)
  5  no such job (404)
  6  the job's state forbids it (409, e.g. cancel a job that has ended)
  7  --timeout passed before the job ended
  130  interrupted (Ctrl-C)

environment: DQ_URL (default http://127.0.0.1:8000), DQ_API_KEY"""

_BY_STATUS = {
    400: Exit.BAD_INPUT,
    401: Exit.UNAUTHORIZED,
    403: Exit.UNAUTHORIZED,
    404: Exit.NOT_FOUND,
    409: Exit.CONFLICT,
    413: Exit.BAD_INPUT,
    422: Exit.BAD_INPUT,
}


def exit_code(error: DQError) -> Exit:
    """The exit status for an error."""
    if isinstance(error, JobFailed):
        return Exit.JOB_FAILED
    if isinstance(error, WaitTimeout):
        return Exit.TIMEOUT
    if isinstance(error, APIError):
        return _BY_STATUS.get(error.status, Exit.UNREACHABLE)
    if isinstance(error, ConnectionFailed):
        return Exit.UNREACHABLE
    return Exit.BAD_INPUT


class UsageError(DQError):
    """An argument that does not make sense (a missing file, a malformed size)."""


def size(text: str) -> tuple[int, int]:
    """`512x512` as (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(width), int(height)


def lora(text: str) -> dict[str, Any]:
    """`name:0.8` (or `name`, scale 1) as a LoRA of the request."""
    name, _, scale = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:SCALE, e.g. ink:0.8") from None


def field(text: str) -> tuple[str, Any]:
    """`key=value` for any request field; the value is JSON if it parses, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def image_source(text: str) -> str:
    """An image for the request: a URL or `data:` URI as it is, a file as a `data:` URI."""
    if text.startswith(("http://", "https://", "data:")):
        return text
    path = Path(text)
    if not path.is_file():
        raise UsageError(f"no such image file: {text}")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request's fields from the submit options (unset ones are left to the server)."""
    width, height = args.size or (None, None)
    options: dict[str, Any] = {
        "width": width,
        "height": height,
        "steps": args.steps,
        "seed": args.seed,
        "num_images": args.n,
        "negative_prompt": args.negative,
        "guidance_scale": args.guidance,
        "output_format": args.format,
        "model": args.model,
        "priority": args.priority,
        "scheduler": args.scheduler,
        "strength": args.strength,
        "loras": args.lora or None,
        "image": image_source(args.image) if args.image else None,
        "mask": image_source(args.mask) if args.mask else None,
        "task": args.task or (("inpaint" if args.mask else "img2img") if args.image else None),
    }
    options.update(dict(args.set or []))
    return options


class Terminal:
    """Where output goes: results on stdout (JSON with --json), progress and errors on stderr."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.out = Console()
        if not self.out.is_terminal:  # piped: no terminal width to respect, keep rows whole
            self.out = Console(width=200)
        self.err = Console(stderr=True)

    def emit(self, data: Any) -> None:
        """Print a result for scripts."""
        print(json.dumps(data, indent=2, default=str), flush=True)

    def fail(self, error: DQError) -> None:
        """Report an error."""
        if self.json:
            body: dict[str, Any] = {"message": error.message, "code": "client_error"}
            if isinstance(error, APIError):
                body |= {"code": error.code, "field": error.field, "status": error.status}
            if isinstance(error, JobFailed):
                body |= {"code": f"job_{error.job.status}", "job": error.job.raw}
            if isinstance(error, WaitTimeout):
                body |= {"code": "timeout", "job": error.job.raw}
            self.emit({"error": body})
        else:
            self.err.print(f"[red]dq:[/] {error}", highlight=False)


class RetryNotice(logging.Handler):
    """Says once on stderr that the server is being retried, so a wait is not a mystery."""

    def __init__(self, console: Console, budget_s: float) -> None:
        super().__init__(logging.INFO)
        self.console, self.budget_s, self.told = console, budget_s, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.told:
            self.told = True
            what = record.getMessage().split("; again in")[0]
            note = f"{what}; retrying for up to {self.budget_s:g} s (--retry-for)"
            self.console.print(f"[yellow]dq:[/] {note}", highlight=False)


def follow(client: Client, job: Job, term: Terminal, timeout: float | None) -> Job:
    """Wait for the job to end; on a terminal, with a live progress bar fed by its events."""
    if job.terminal:
        return job
    if term.json or not term.err.is_terminal:
        return client.wait(job, timeout)
    updates: queue.Queue[Job | BaseException] = queue.Queue()

    def listen() -> None:
        try:
            for current in client.events(job):
                updates.put(current)
        except BaseException as e:
            updates.put(e)

    # The stream is read on a thread so that --timeout and Ctrl-C act at once.
    threading.Thread(target=listen, daemon=True, name="dq-events").start()
    deadline = None if timeout is None else time.monotonic() + timeout
    current = job
    with display.ProgressView(term.err) as view:
        view.show(current)
        while not current.terminal:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                update = updates.get(timeout=left if left is None else max(0.0, left))
            except queue.Empty:
                raise WaitTimeout(current, timeout or 0) from None
            if isinstance(update, BaseException):
                raise update
            current = update
            view.show(current)
    return current


def finish(client: Client, job: Job, out: Path, term: Terminal) -> int:
    """Report an ended job and write its images."""
    if not job.succeeded:
        raise JobFailed(job)
    paths = client.download(job, out)
    if term.json:
        term.emit({**job.raw, "files": [str(p) for p in paths]})
    else:
        m = job.metrics
        term.err.print(
            f"{job.id} succeeded (queued {display.seconds(m.queue_s)}, "
            f"ran {display.seconds(m.run_s)})",
            highlight=False,
        )
        for path in paths:
            term.out.print(str(path), highlight=False, soft_wrap=True)
    return Exit.OK


def submit(client: Client, args: argparse.Namespace, term: Terminal) -> int:
    """dq submit."""
    job = client.submit(args.prompt, idempotency_key=args.idempotency_key, **request_options(args))
    if not (args.wait or args.out):
        if term.json:
            term.emit(job.raw)
        else:
            term.out.print(job.id, highlight=False)
            if job.queue is not None:
                eta = display.seconds(job.queue.eta_s)
                term.err.print(f"queued at position {job.queue.position}, ETA {eta}")
        return Exit.OK
    return finish(client, follow(client, job, term, args.timeout), Path(args.out or "."), term)


def jobs(client: Client, args: argparse.Namespace, term: Terminal) -> int:
    """dq jobs."""
    found = list(client.list(args.status, limit=args.limit, page_size=min(args.limit, 100)))
    if term.json:
        term.emit([job.raw for job in found])
    else:
        term.out.print(display.jobs_table(found))
    return Exit.OK


def show(client: Client, args: argparse.Namespace, term: Terminal) -> int:
    """dq show."""
    job = client.get(args.id)
    if term.json:
        term.emit(job.raw)
    else:
        term.out.print(display.job_details(job))
        for output in job.outputs:  # whole, however narrow the terminal: to be copied
            term.out.print(output.url, soft_wrap=True, highlight=False)
    return Exit.OK


def cancel(client: Client, args: argparse.Namespace, term: Terminal) -> int:
    """dq cancel."""
    job = client.cancel(args.id)
    if term.json:
        term.emit(job.raw)
    else:
        term.out.print(f"{job.id} {job.status}", highlight=False)
    return Exit.OK


def get(client: Client, args: argparse.Namespace, term: Terminal) -> int:
    """dq get: wait for the job if it has not ended, then write its images."""
    job = follow(client, client.get(args.id), term, args.timeout)
    return finish(client, job, Path(args.out), term)


def top(client: Client, args: argparse.Namespace, term: Terminal) -> int:
    """dq top: the queue, redrawn every --interval seconds until Ctrl-C."""
    title = f"diffusion-queue at {client.config.url}"
    if term.json or args.once:
        snapshot = client.queue().raw
        if term.json:
            term.emit(snapshot)
        else:
            term.out.print(display.queue_view(snapshot, title))
        return Exit.OK
    data: dict[str, Any] = {}
    with Live(display.queue_view(data, title), console=term.out, screen=False) as live:
        while True:
            problem = None
            try:
                data = client.queue().raw
            except (ConnectionFailed, APIError) as e:
                problem = f"{time.strftime('%H:%M:%S')} {e}; retrying"
            stamp = f"{title}  {time.strftime('%H:%M:%S')}"
            live.update(display.queue_view(data, stamp, problem))
            time.sleep(args.interval)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Terminal], int]] = {
    "submit": submit,
    "jobs": jobs,
    "show": show,
    "cancel": cancel,
    "get": get,
    "top": top,
}


def parser(prog: str = "dq") -> argparse.ArgumentParser:
    """The client's command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the server (default: $DQ_URL, else http://127.0.0.1:8000)")
    common.add_argument("--key", help="the API key (default: $DQ_API_KEY)")
    common.add_argument("--json", action="store_true", help="print JSON on stdout, for scripts")
    common.add_argument(
        "--retry-for",
        type=float,
        default=60.0,
        metavar="S",
        help="keep retrying an unreachable or busy server this long (default 60)",
    )
    text: dict[str, Any] = {
        "epilog": EXIT_HELP,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    # The shared options belong to each subcommand only: argparse would let a subcommand's
    # defaults overwrite the same options given before it.
    kw: dict[str, Any] = {"parents": [common], **text}
    p = argparse.ArgumentParser(prog=prog, description="diffusion-queue client", **text)
    sub = p.add_subparsers(dest="command", required=True)
    _submit_parser(sub.add_parser("submit", help="submit a job (and wait for it)", **kw))
    js = sub.add_parser("jobs", help="your jobs, newest first", **kw)
    js.add_argument("--status", choices=[s.value for s in JobStatus])
    js.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    sub.add_parser("show", help="one job in full", **kw).add_argument("id")
    sub.add_parser("cancel", help="cancel a job that has not ended", **kw).add_argument("id")
    g = sub.add_parser("get", help="write a job's images (waiting for it if needed)", **kw)
    g.add_argument("id")
    g.add_argument("--out", default=".", help="folder for the images (default: here)")
    g.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    t = sub.add_parser("top", help="a live view of the queue", **kw)
    t.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    t.add_argument("--once", action="store_true", help="draw once and exit")
    return p


def _submit_parser(s: argparse.ArgumentParser) -> None:
    s.add_argument("prompt")
    s.add_argument("--size", type=size, help="WIDTHxHEIGHT, e.g. 512x512")
    s.add_argument("--steps", type=int, help="denoising steps")
    s.add_argument("--seed", type=int, help="seed of the first image (chosen if absent)")
    s.add_argument("--n", type=int, help="images (seeds seed, seed+1, …)")
    s.add_argument("--negative", help="negative prompt")
    s.add_argument("--guidance", type=float, help="guidance scale")
    s.add_argument("--format", choices=["png", "jpeg", "webp"], help="image format")
    s.add_argument("--model", help="the model to run")
    s.add_argument("--lora", type=lora, action="append", help="NAME:SCALE (repeatable)")
    s.add_argument("--image", help="input image: a file, an https URL or a data: URI")
    s.add_argument("--mask", help="inpainting mask: a file, an https URL or a data: URI")
    s.add_argument("--strength", type=float, help="how far img2img departs from the image")
    s.add_argument("--task", choices=["txt2img", "img2img", "inpaint"])
    s.add_argument("--scheduler", help="the sampler")
    s.add_argument("--priority", choices=["high", "normal", "low"])
    s.add_argument(
        "--set", type=field, action="append", metavar="KEY=VALUE", help="any request field"
    )
    s.add_argument("--idempotency-key", help="replays the same job if sent again")
    s.add_argument("--wait", action="store_true", help="wait, showing progress, and write images")
    s.add_argument("--out", help="folder for the images (implies --wait; default: here)")
    s.add_argument("--timeout", type=float, help="give up waiting after this many seconds")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one client command; the exit status says how it went (see EXIT_HELP)."""
    name = prog or Path(sys.argv[0]).name
    args = parser(name).parse_args(argv)
    term = Terminal(args.json)
    # `dq top` redraws every second or so: a server that stays away is shown, not waited on.
    budget = min(args.retry_for, 2.0) if args.command == "top" else args.retry_for
    retry = RetryPolicy(give_up_after_s=budget)
    logger = logging.getLogger("dq_client")
    notice = RetryNotice(term.err, budget)
    if not args.json and args.command != "top":
        logger.setLevel(logging.INFO)
        logger.addHandler(notice)
    try:
        with Client(args.url, args.key, retry=retry) as client:
            return COMMANDS[args.command](client, args, term)
    except DQError as e:
        term.fail(e)
        return exit_code(e)
    except KeyboardInterrupt:
        term.err.print("interrupted")
        return Exit.INTERRUPTED
    finally:
        logger.removeHandler(notice)
