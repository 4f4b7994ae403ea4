"""`python -m api`: run the gateway with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from fastapi import FastAPI

from api.app import create_app
from core.errors import ConfigError
from core.settings import load_settings

SHUTDOWN_GRACE_S = 5


def factory() -> FastAPI:
    """The app for this process's settings (each uvicorn worker process builds its own)."""
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    return create_app(settings)


def main(argv: list[str] | None = None) -> int:
    """Parse --host/--port/--workers, check settings, serve."""
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="gateway processes (one per core)")
    args = parser.parse_args(argv)
    try:
        load_settings().require_redis()
    except ConfigError as e:
        print(f"dq api: {e.message}")
        return 2
    uvicorn.run(
        "api.__main__:factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        # Long polls and event streams may be held for a while: a stopping gateway gives them
        # this long, then cuts them (their clients simply ask again, elsewhere).
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
