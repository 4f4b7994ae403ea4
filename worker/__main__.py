"""`python -m worker`: one Celery worker process owning one GPU (or the CPU)."""

from __future__ import annotations

import argparse
import logging

from core.settings import load_settings
from worker.app import create_celery, default_name


def main(argv: list[str] | None = None) -> None:
    """Start a batching worker on the job queue."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--name", default=None, help="worker name (default: unique per process)")
    args = parser.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    app = create_celery(settings)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--queues={settings.queue_name}",
            f"--hostname={args.name or default_name()}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()
