"""The Celery messages the ledger writes straight into broker lists: run a job, send a webhook.

The gateway and the reaper push this envelope (Celery task protocol 2, as kombu's Redis transport
stores it) inside the same Lua call that writes the job record, so a job is never recorded without
its message nor sent without its record. The worker consumes it with Celery as usual.
"""

from __future__ import annotations

import base64
import json
import uuid

from pydantic import BaseModel, Field

from core.events import DeliveryOrder

GENERATE_TASK = "dq.generate"
DELIVER_TASK = "dq.deliver_webhook"


class DeliveryInfo(BaseModel):
    """Where kombu routes the message."""

    exchange: str = ""
    routing_key: str


class Properties(BaseModel):
    """kombu's message properties."""

    correlation_id: str
    reply_to: str = ""
    delivery_mode: int = 2
    delivery_info: DeliveryInfo
    priority: int = 0
    body_encoding: str = "base64"
    delivery_tag: str = Field(default_factory=lambda: str(uuid.uuid4()))


class TaskMessage(BaseModel):
    """A Celery protocol-2 task message in kombu's Redis envelope."""

    body: str
    content_encoding: str = Field(default="utf-8", serialization_alias="content-encoding")
    content_type: str = Field(default="application/json", serialization_alias="content-type")
    headers: dict[str, object]
    properties: Properties


def generate_message(job_id: str, queue: str, origin: str = "dq") -> str:
    """The serialized message asking a worker to run `job_id`."""
    return task_message(GENERATE_TASK, [job_id], queue, origin)


def delivery_message(order: DeliveryOrder, queue: str) -> str:
    """The serialized message asking the webhook sender to make one delivery attempt."""
    return task_message(DELIVER_TASK, [order.model_dump(mode="json")], queue)


def task_message(task: str, args: list[object], queue: str, origin: str = "dq") -> str:
    """The serialized protocol-2 message calling `task(*args)` on `queue`."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None}])
    headers: dict[str, object] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "timelimit": [None, None],
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": origin,
        "ignore_result": True,
    }
    message = TaskMessage(
        body=base64.b64encode(body.encode()).decode(),
        headers=headers,
        properties=Properties(
            correlation_id=task_id, delivery_info=DeliveryInfo(routing_key=queue)
        ),
    )
    return message.model_dump_json(by_alias=True)
