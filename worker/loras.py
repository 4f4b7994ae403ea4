"""The LoRAs loaded into a worker's pipeline: switched per batch, cached under a byte budget.

LoRAs go through diffusers' adapter API (peft), so each one is a set of small extra layers beside
the base weights, never merged into them: switching sets is a matter of which adapters are active
and at what weight, and a batch without LoRAs runs with every adapter off, on the base weights as
they were loaded. In the step engine, `StepAdapters` shares them between its threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import ServiceError
from core.loras import LoraCatalog

log = logging.getLogger(__name__)

LoraSet = Sequence[tuple[str, float]]


class AdapterError(ServiceError):
    """A LoRA a batch asked for could not be put to use."""

    code = "lora_failed"


@dataclass(frozen=True)
class Loaded:
    """A LoRA loaded into the pipeline under its adapter name."""

    adapter: str
    size_bytes: int


class Adapters:
    """The LoRAs of one pipeline: which are loaded (least recently used first), which are on."""

    def __init__(self, pipe: Any, catalog: LoraCatalog, budget_bytes: int) -> None:
        self.pipe = pipe
        self.catalog = catalog
        self.budget_bytes = budget_bytes
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()
        # None while unknown (a switch failed half way): the next batch sets every adapter again.
        self.active: tuple[tuple[str, float], ...] | None = ()
        self.loads = 0  # files read from disk since start: what the cache saves
        self._made = 0

    def use(self, loras: LoraSet) -> None:
        """Make exactly `loras` (name, scale) active for the next pipeline call."""
        wanted = tuple(loras)
        if wanted == self.active:
            return
        self.active = None
        if not wanted:
            # Every adapter off: the layers pass the base weights' output through untouched.
            if self.loaded:
                self.pipe.disable_lora()
            self.active = ()
            return
        adapters = [self._load(name).adapter for name, _ in wanted]
        self._evict(keep={name for name, _ in wanted})
        self.pipe.enable_lora()
        self.pipe.set_adapters(adapters, adapter_weights=[scale for _, scale in wanted])
        self.active = wanted

    def _load(self, name: str) -> Loaded:
        """The LoRA `name`, from the cache or loaded from its file now."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        found = self.catalog.get(name)
        if found is None:
            raise AdapterError(f"unknown LoRA {name!r}: this worker's LoRA folder has no such file")
        # Adapter names become module keys, where dots are not allowed: use our own.
        self._made += 1
        adapter = f"dq{self._made}"
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters are the point.
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                self.pipe.load_lora_weights(str(found.path), adapter_name=adapter)
        except Exception as e:
            # A failed load can leave half an adapter behind; it must not reach the next batch.
            with contextlib.suppress(Exception):
                self.pipe.delete_adapters(adapter)
            raise AdapterError(f"LoRA {name!r} could not be loaded: {_first_line(e)}") from e
        self.loads += 1
        self.loaded[name] = Loaded(adapter, found.size_bytes)
        log.info("loaded LoRA %s (%d KiB) as %s", name, found.size_bytes // 1024, adapter)
        return self.loaded[name]

    def _evict(self, keep: set[str]) -> None:
        """Unload the least recently used LoRAs outside `keep` until the cache fits its budget."""
        for name in list(self.loaded):
            if sum(x.size_bytes for x in self.loaded.values()) <= self.budget_bytes:
                return
            if name not in keep:
                self.pipe.delete_adapters(self.loaded.pop(name).adapter)
                log.info("unloaded LoRA %s", name)


class StepAdapters:
    """A pipeline's `Adapters` as the step engine's threads share them (`worker.loop.Adapters`).

    `Adapters.use` switches the whole pipeline at once: the UNet's adapters and the text encoders',
    and it loads LoRAs into both and unloads the least recently used. The step engine encodes
    prompts on its intake thread while its loop thread runs the UNet, each with the LoRA set of
    its own jobs: were either to switch while the other is between its switch and its call, the
    other's call would run with the wrong set (and a load or an unload reshapes modules under a
    running call). So a thread holds a set for the length of its call (`hold`), and a switch
    happens only while no thread holds a set:

    - holders of the active set run side by side: while every job has the same set (the usual
      case: none), the intake and the loop never wait for each other;
    - a thread that wants another set waits until the holders of the active one are done, then
      switches and holds. First come, first served: while one waits, newcomers wait behind it even
      for the active set, so a loop stepping one set cannot starve the intake of another (nor the
      other way round): the loop waits at most for an encoding in progress and a switch.

    A hold lasts until the call is issued. On a GPU its kernels may still be running after that,
    which a switch does not disturb: they were issued with the adapters and scales of their set,
    and weights unloaded are freed in stream order on the one stream every thread uses.

    Switching on one thread only (the loop's) would instead put the intake's encodings of other
    sets on the loop thread, which is kept for denoiser calls. Per-part switches (only the UNet's
    adapters on the loop, only the text encoders' on the intake) would still have to serialize
    loads and unloads, which change both.

    Switches run outside inference mode whatever the caller's (the loop thread steps inside it):
    adapter weights loaded as inference tensors could not be loaded beside or switched later
    outside it, as the batch engine does. A set that cannot be made active (`AdapterError`)
    raises from `hold` and leaves the adapters for the next switch to set again.

    The batch engine calls `Adapters.use` without this lock; the step runner runs batches only
    while the step engine is empty, when no thread holds a set.
    """

    def __init__(self, adapters: Adapters) -> None:
        self.adapters = adapters
        self.switches = 0  # sets made active (the empty set too): what holding a set costs
        self._cond = threading.Condition()
        self._holders = 0  # threads inside a `hold` of the active set
        self._line: deque[object] = deque()  # threads waiting to hold, in arrival order

    @contextlib.contextmanager
    def hold(self, loras: LoraSet, part: str) -> Iterator[None]:
        """`loras` active on the whole pipeline until the block ends (`part` is not needed: a
        switch is pipeline-wide)."""
        self._take(tuple(loras))
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                self._cond.notify_all()

    def _take(self, wanted: tuple[tuple[str, float], ...]) -> None:
        """Wait for the turn, make `wanted` active if it is not, and count as a holder."""
        turn = object()
        with self._cond:
            self._line.append(turn)
            try:
                self._cond.wait_for(
                    lambda: (
                        self._line[0] is turn
                        and (self._holders == 0 or self.adapters.active == wanted)
                    )
                )
                if self.adapters.active != wanted:  # no one holds a set: nothing runs with it
                    self.switches += 1
                    with torch.inference_mode(False):
                        self.adapters.use(wanted)
                self._holders += 1
            finally:
                self._line.remove(turn)
                self._cond.notify_all()


def _first_line(error: Exception) -> str:
    """The first line of an error's text, which for a shape mismatch says enough."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
