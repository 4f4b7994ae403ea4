"""What both kinds of Celery worker share: at-least-once settings, and how a worker starts.

The GPU worker (worker/app.py) and the webhook sender (worker/webhooks.py) differ in their task,
pool and bootstep; both ack late, requeue on a lost worker, use the one visibility timeout every
process shares, and reconnect to Redis forever.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from celery import Celery

from core import connections
from core.settings import Settings, load_settings
from core.tracing import Tracing

# Library loggers whose warnings print request text: diffusers' pipelines log the part of a prompt
# past CLIP's 77 tokens (one long request made ~100 KB of log), transformers' tokenizer warns on
# long inputs. Their errors still come through.
PROMPT_ECHOING_LOGGERS = ("diffusers.pipelines", "transformers.tokenization_utils_base")


def at_least_once(name: str, settings: Settings, queue: str, **conf: Any) -> Celery:
    """A Celery app on the queue, configured so that no message is acked before its work."""
    broker = connections.celery_broker(settings)
    app = Celery(name, broker=broker.url, set_as_current=True)
    transport = {"visibility_timeout": settings.visibility_timeout_s, **broker.transport_options}
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_hijack_root_logger=False,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_ignore_result=True,
        **conf,
    )
    app.dq_settings = settings  # type: ignore[attr-defined]
    return app


def run(
    prog: str,
    doc: str | None,
    build: Callable[[Settings], Celery],
    worker_args: Callable[[Settings, str | None], list[str]],
    argv: list[str] | None = None,
    service: str = "dq-worker",
) -> None:
    """Parse --name, read settings, configure logging and tracing, start the Celery worker."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--name", default=None, help="worker name (default: unique per process)")
    args = parser.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    for name in PROMPT_ECHOING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    common = [f"--loglevel={settings.log_level}", "--without-gossip", "--without-mingle"]
    app = build(settings)
    app.dq_tracing = tracing = Tracing.start(service)  # off unless OTEL_* asks for it
    try:
        # --quiet: no start-up banner (the worker logs one line when it is ready).
        app.worker_main(
            ["--quiet", "worker", *worker_args(settings, args.name), *common, "--without-heartbeat"]
        )
    finally:
        tracing.shutdown()  # the spans of the last batches
