"""What the ledger counts in `keys.METRICS`, for the gateway's /metrics to read at scrape time.

Every count is written once per event by the process the event happens in, in the same Redis
step as the event where there is one (a job's end, a dispatch, a limit hit, a delivery attempt
logged), so no gateway replica or worker double-counts and nothing is lost to a process that
dies. The fields of the hash (model names, tenants and codes hold no ':'):

- `finished:<model>:<status>:<code>` jobs ended (code '' unless failed); `served:<tenant>` work
  units of succeeded jobs (the first MAX_TENANTS tenants, then `OTHER_TENANT`), `served#` how
  many tenants have a field (core/lua/ledger.lua `count_end`);
- `dispatches:<model>:<class>`, `limited:<limit>`, `reaper:<action>`;
- `webhook:<outcome>:<attempt>` delivery attempts logged (core/deliveries.py);
- histograms: `h:<name>:<model>:<le>` observations in the bucket whose upper bound is `le` (not
  cumulative: the reader adds them up), `hs:<name>:<model>` their sum. A job's times are
  observed by the transition script that ends it, from the record itself; batches and the step
  loop's calls by the worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from core import keys
from core.jobs import ErrorInfo, Metrics

# Seconds: queue wait, run, end to end, storage. One set of bounds for all four (a quick GPU job
# stores in 50 ms, a deep backlog waits for minutes).
JOB_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # DQ_MAX_BATCH_SIZE is at most 64
BATCH_FILL = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BOUNDS: dict[str, tuple[float, ...]] = {
    "queue": JOB_SECONDS,
    "run": JOB_SECONDS,
    "e2e": JOB_SECONDS,
    "storage": JOB_SECONDS,
    "batch_size": BATCH_ROWS,
    "batch_fill": BATCH_FILL,
    "step_rows": BATCH_ROWS,
}
INF = "+Inf"
MAX_TENANTS = 50  # tenants with a `served` series of their own; the rest share OTHER_TENANT
OTHER_TENANT = "_other"  # not a valid tenant name (they start with a letter or digit)
ATTEMPT_LABELS = 5  # webhook attempts 1..5 are labelled as such, later ones "6+"


def le(bound: float) -> str:
    """A bucket's upper bound as its field and label spell it."""
    return format(bound, "g")


def bucket(value: float, bounds: tuple[float, ...]) -> str:
    """The bucket an observation falls in (the smallest bound at or above it)."""
    for bound in bounds:
        if value <= bound:
            return le(bound)
    return INF


def ending(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What the transition script needs to count a job's end: its error code, the job-time
    buckets, and the times only the caller knows (storage: the pipeline's return to the images'
    being stored, the worker's own timestamps)."""
    error = fields.get("error")
    code = error.code if isinstance(error, ErrorInfo) else ""
    observed = []
    done, finished = fields.get("metrics"), fields.get("finished_at")
    if isinstance(done, Metrics) and done.model_done_at is not None and finished is not None:
        observed.append(["storage", max(0.0, float(finished) - done.model_done_at)])
    return {"code": code, "le": [le(b) for b in JOB_SECONDS], "obs": observed}


class Pipeline(Protocol):
    """The two commands an observation takes (a redis-py pipeline)."""

    def hincrby(self, name: str, key: str, amount: int = 1) -> Any:
        """Add to an integer field."""

    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> Any:
        """Add to a float field."""


def observe(pipe: Pipeline, name: str, model: str, value: float, times: int = 1) -> None:
    """Queue `times` observations of `value` in histogram `name` on `pipe` (the caller executes
    it)."""
    pipe.hincrby(keys.METRICS, f"h:{name}:{model}:{bucket(value, BOUNDS[name])}", times)
    pipe.hincrbyfloat(keys.METRICS, f"hs:{name}:{model}", value * times)


def attempt_label(attempt: int) -> str:
    """A delivery attempt's label: "1" to "5", then "6+" (the retry schedule may be long)."""
    return str(attempt) if attempt <= ATTEMPT_LABELS else f"{ATTEMPT_LABELS + 1}+"


def delivery_field(outcome: str, attempt: int) -> str:
    """The counter of one logged webhook attempt."""
    return f"webhook:{outcome}:{attempt_label(attempt)}"
