"""Python SDK for diffusion-queue: submit text-to-image jobs, wait for them, fetch the images.

from dq_client import Client

with Client("http://127.0.0.1:8000", "my-key") as dq:
    for image in dq.run("a lighthouse at dusk", width=512, height=512, num_images=2):
        image.save(".")
"""

from dq_client.aio import AsyncClient
from dq_client.client import Client
from dq_client.errors import (
    APIError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    DQError,
    Forbidden,
    JobFailed,
    JobNotFinished,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationError,
    WaitTimeout,
    WebhookVerificationError,
)
from dq_client.images import Image
from dq_client.models import (
    Job,
    JobError,
    JobRequest,
    JobStatus,
    Metrics,
    Model,
    Output,
    Progress,
    QueueInfo,
    QueueStatus,
    ScalerDecision,
)
from dq_client.retry import RetryPolicy
from dq_client.webhooks import verify_webhook

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DQError",
    "Forbidden",
    "Image",
    "Job",
    "JobError",
    "JobFailed",
    "JobNotFinished",
    "JobRequest",
    "JobStatus",
    "Metrics",
    "Model",
    "NotFound",
    "Output",
    "PayloadTooLarge",
    "Progress",
    "QueueInfo",
    "QueueStatus",
    "RateLimited",
    "RetryPolicy",
    "ScalerDecision",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "WaitTimeout",
    "WebhookVerificationError",
    "verify_webhook",
]
