"""The `dq` command: run the system, its parts, its benchmarks and its checks."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from core.console import Console, ConsoleHandler
from core.errors import ConfigError
from core.launcher import Launch, up
from core.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent

# Subcommands that are whole programs of their own: `dq NAME args…` runs `python -m MODULE args…`.
PROGRAMS = {
    "api": ("api", "the HTTP gateway"),
    "worker": ("worker", "one batching GPU/CPU worker"),
    "scaler": ("scaler", "the autoscaler and reaper (also: dq scaler simulate)"),
    "bench": ("bench", "the benchmarks (dq bench --help)"),
    "keys": ("core.keyadmin", "API keys, tenants' limits and webhook secrets (dq keys --help)"),
}

# Client subcommands: `dq NAME args…` runs the client package's command line (client/).
CLIENT = {
    "submit": "submit a job (--wait: show progress and write the images)",
    "jobs": "your jobs, newest first",
    "show": "one job in full",
    "cancel": "cancel a job",
    "get": "write a job's images",
    "top": "a live view of the queue, workers and scaler",
}

CHECKS = [
    ["ruff", "check", "."],
    ["ruff", "format", "--check", "."],
    ["mypy"],
    ["pytest", "-q"],
]


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="dq",
        description="diffusion-queue: text-to-image jobs at scale",
        epilog="dq submit --help (and jobs, show, cancel, get, top): options and exit codes",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("up", help="run everything on this machine (Ctrl-C stops it)")
    run.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    run.add_argument(
        "--min-workers",
        type=int,
        help="the default model's fewest workers (default: its catalog entry's, DQ_SCALER_MIN)",
    )
    run.add_argument(
        "--max-workers",
        type=int,
        help="the default model's most workers (default: its catalog entry's, DQ_SCALER_MAX)",
    )
    run.add_argument(
        "-v", "--verbose", action="store_true", help="every line of every part, as written"
    )
    for name, (_, text) in PROGRAMS.items():
        sub.add_parser(name, help=text, add_help=False)
    for name, text in CLIENT.items():
        sub.add_parser(name, help=text, add_help=False)
    test = sub.add_parser("test", help="lint, format check, types and the whole test suite")
    test.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    return p


def check(extra: list[str]) -> int:
    """Run every check from the repository root; the first failure decides the exit code."""
    bindir = Path(sys.executable).parent
    for argv in CHECKS:
        cmd = [str(bindir / argv[0]), *argv[1:], *(extra if argv[0] == "pytest" else [])]
        print("$", " ".join([argv[0], *cmd[1:]]), flush=True)
        code = subprocess.call(cmd, cwd=ROOT)
        if code != 0:
            return code
    return 0


def client(argv: list[str]) -> int:
    """A client subcommand, run by the client package (which never imports the server)."""
    try:
        from dq_client.cli import main as client_main
    except ImportError:
        print(
            "dq: the client commands need the client: pip install -e './client[cli]'",
            file=sys.stderr,
        )
        return 2
    return client_main(argv, prog="dq")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dq`."""
    args, rest = parser().parse_known_args(argv)
    if args.command in CLIENT:
        return client([args.command, *rest])
    if args.command in PROGRAMS:
        target = PROGRAMS[args.command][0]
        os.execv(sys.executable, [sys.executable, "-m", target, *rest])
    if args.command == "test":
        return check([*args.pytest_args, *rest])
    console = Console.for_terminal(verbose=args.verbose)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, handlers=[ConsoleHandler(console)])
    try:
        settings = load_settings()
        launch = Launch(
            args.host, args.port, args.min_workers, args.max_workers, verbose=args.verbose
        )
        return up(settings, launch, console)
    except ConfigError as e:
        print(f"dq: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
