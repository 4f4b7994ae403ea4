"""The LoRAs loaded into a worker's pipeline: switched per batch, cached under a byte budget.

LoRAs go through diffusers' adapter API (peft), so each one is a set of small extra layers beside
the base weights, never merged into them: switching sets is a matter of which adapters are active
and at what weight, and a batch without LoRAs runs with every adapter off, on the base weights as
they were loaded.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def _first_line(error: Exception) -> str:
    """The first line of an error's text, which for a shape mismatch says enough."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
