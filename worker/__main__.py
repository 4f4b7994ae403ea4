"""`python -m worker`: one Celery worker process owning one GPU (or the CPU)."""

from __future__ import annotations

from core.settings import Settings
from core.store import Ledger
from worker.app import create_celery, default_name, served
from worker.celeryapp import run


def worker_args(settings: Settings, name: str | None) -> list[str]:
    """One process, no pool: the runner owns the pipeline."""
    return [
        "--pool=solo",
        f"--queues={Ledger.of(settings).queue_of(served(settings))}",
        f"--hostname={name or default_name()}",
    ]


def main(argv: list[str] | None = None) -> None:
    """Start a batching worker on the job queue."""
    run("python -m worker", __doc__, create_celery, worker_args, argv)


if __name__ == "__main__":
    main()
