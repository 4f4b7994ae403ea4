"""Engines with injected bugs, loaded by a real worker through `DQ_ENGINE_FACTORY`.

`unloadable` is a model that cannot load. `faulty` is the real tiny engine with a bug that a
prompt triggers, so one worker process runs good jobs and poisoned ones side by side:

- `fault:raise`: the call raises an ordinary exception (a bug in the engine's code);
- `fault:exit`: the call raises SystemExit (a library that calls `sys.exit()`), which is not an
  `Exception` and, left alone, ends a thread without a word;
- `fault:hang`: the call never returns (a wedged device call, a deadlock).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from PIL.Image import Image

from core.catalog import ModelSpec
from core.jobs import Bucket
from core.loras import LoraCatalog
from worker.claims import Generator
from worker.inference import Row, StepHook, load_engine

RAISE, EXIT, HANG = "fault:raise", "fault:exit", "fault:hang"
LOADING_S = 6.0  # how long `unloadable` takes to fail


def unloadable(
    spec: ModelSpec, cache_dir: Path, loras: LoraCatalog | None = None, lora_cache_bytes: int = 0
) -> Generator:
    """A model whose weights cannot be read: it takes a while to find out, as a real one does,
    and meanwhile the worker's consumer receives messages."""
    time.sleep(LOADING_S)
    raise OSError(f"the weights of {spec.name} are corrupt (injected)")


class Faulty:
    """The real engine, with the bug a row's prompt asks for."""

    def __init__(self, engine: Generator) -> None:
        self.engine = engine

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """The real call, unless a prompt injects a fault."""
        prompts = {row.prompt for row in rows}
        if RAISE in prompts:
            raise RuntimeError("an engine bug (injected)")
        if EXIT in prompts:
            raise SystemExit("the engine called sys.exit() (injected)")
        if HANG in prompts:
            threading.Event().wait()  # forever
        return self.engine.generate(rows, bucket, on_step)


def faulty(
    spec: ModelSpec, cache_dir: Path, loras: LoraCatalog | None = None, lora_cache_bytes: int = 0
) -> Generator:
    """The tiny model, with prompt-triggered bugs."""
    return Faulty(load_engine(spec, cache_dir, loras, lora_cache_bytes))
