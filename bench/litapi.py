"""The peer's server: LitServe serving the worker's pipeline (`python -m bench.litapi`).

The LitAPI loads the model as a worker does and makes the worker's call (`Engine.generate`) on a
batch of validated `JobRequest`s (one call per bucket: requests of other sizes, steps or guidance
cannot share one), then answers each request with its PNG, base64-encoded: the same work as the
worker's encode and store, without the durability (a request lost with the server is lost for
good). Kept apart from `bench.peer` so that only this process imports LitServe.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run time
# to build the endpoint, and a string would make FastAPI refuse every body with 422.
import argparse
import base64
from typing import Any

import litserve as ls

from bench.direct import DirectSpec
from core.jobs import Bucket, JobRequest


class DiffusionAPI(ls.LitAPI):  # type: ignore[misc]
    """Text to image, batched by LitServe."""

    def __init__(self, spec: DirectSpec, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_spec = spec

    def setup(self, device: str) -> None:
        """Load the model the way a worker does."""
        from worker.inference import Engine
        from worker.models import load_pipeline, set_cpu_threads

        set_cpu_threads(self.model_spec.threads)
        pipe = load_pipeline(
            self.model_spec.model,
            self.model_spec.cache_dir,
            device=self.model_spec.device,
            dtype=self.model_spec.dtype,
        )
        self.engine = Engine(pipe)

    def decode_request(self, request: JobRequest) -> JobRequest:
        """The body, validated by FastAPI as the gateway validates it."""
        return request

    def batch(self, inputs: list[JobRequest]) -> list[JobRequest]:
        """A batch is the list of requests."""
        return inputs

    def predict(self, x: JobRequest | list[JobRequest]) -> Any:
        """One pipeline call per bucket of the batch (size, steps, guidance, ...: what one call
        must share); a lone request when batching is off."""
        from worker.inference import Row

        requests = x if isinstance(x, list) else [x]
        buckets: dict[Bucket, list[int]] = {}
        for i, r in enumerate(requests):
            buckets.setdefault(Bucket.of(r), []).append(i)
        images: list[Any] = [None] * len(requests)
        for bucket, indexes in buckets.items():
            rows = [
                Row(
                    f"peer{i}",
                    0,
                    requests[i].prompt,
                    requests[i].negative_prompt,
                    requests[i].seed or 0,
                )
                for i in indexes
            ]
            made = self.engine.generate(rows, bucket, lambda _step: True)
            for i, image in zip(indexes, made, strict=True):
                images[i] = image
        return images if isinstance(x, list) else images[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        """One image per request."""
        return list(output)

    def encode_response(self, output: Any) -> dict[str, str]:
        """The image as a base64 PNG."""
        from worker.batch import encode

        return {"image": base64.b64encode(encode(output, "png")).decode()}


def main(argv: list[str] | None = None) -> None:
    """Serve the peer on loopback."""
    parser = argparse.ArgumentParser(prog="python -m bench.litapi", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", required=True, help="a DirectSpec as JSON")
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--batch-timeout", type=float, required=True)
    args = parser.parse_args(argv)
    spec = DirectSpec.model_validate_json(args.spec)
    api = DiffusionAPI(spec, args.max_batch_size, args.batch_timeout)
    accelerator = "cuda" if (spec.device or "cpu").startswith("cuda") else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, workers_per_device=1, timeout=600)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
