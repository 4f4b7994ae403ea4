"""LoRAs in the engine: real tiny models and tiny random LoRAs, through diffusers' adapter API;
and `StepAdapters`, which shares them between the step engine's threads."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from PIL.Image import Image

from core.catalog import Catalog
from core.jobs import Bucket
from core.settings import Settings
from worker.inference import Engine, Row, load_engine
from worker.loras import AdapterError, Adapters, StepAdapters
from worker.models import build_tiny_lora, load_pipeline

ROWS = [Row("job_a", 0, "a red boat", None, 11), Row("job_b", 0, "a green hill", "fog", 12)]
# One LoRA's bytes (see tests/test_catalog.py): a budget of one keeps one LoRA loaded.
TINY_LORA_BYTES = 92_160


def bucket(*loras: tuple[str, float]) -> Bucket:
    """The tiny model's 64 x 64, 3-step bucket with a LoRA set."""
    return Bucket(64, 64, 3, 7.5, model="tiny", loras=tuple(sorted(loras)))


def pixels(images: Sequence[Image]) -> np.ndarray:
    """A batch's images as one array."""
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def distance(a: Sequence[Image], b: Sequence[Image]) -> float:
    """Mean absolute pixel difference between two batches, on the 0..255 scale."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


def run(engine: Engine, b: Bucket, rows: Sequence[Row] = ROWS) -> list[Image]:
    """One batch, every step allowed."""
    return engine.generate(rows, b, lambda _step: True)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The model on one thread, as the tests' workers run it: two threads on a shared two-core
    machine spin against each other and make every call ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ink and neon for tiny, wide for tiny-sd2."""
    folder = tmp_path_factory.mktemp("loras")
    build_tiny_lora(folder / "ink.safetensors", "tiny", seed=1)
    build_tiny_lora(folder / "neon.safetensors", "tiny", seed=2)
    build_tiny_lora(folder / "wide.safetensors", "tiny-sd2", seed=3)
    return folder


def tiny_engine(
    model_cache: Path, lora_dir: Path, budget: int = 1 << 30, model: str = "tiny"
) -> Engine:
    """A worker's engine for a tiny model, as a worker loads it from its catalog."""
    catalog = Catalog.from_settings(Settings(model=model, loras=lora_dir, model_cache=model_cache))
    return load_engine(catalog.get(None), model_cache, catalog.loras, budget)


@pytest.fixture(scope="module")
def engine(model_cache: Path, lora_dir: Path) -> Engine:
    """One worker's engine, shared by the tests of this module (each sets its own LoRAs)."""
    return tiny_engine(model_cache, lora_dir)


@pytest.fixture(scope="module")
def base(model_cache: Path, lora_dir: Path) -> list[Image]:
    """The base model's images of ROWS, from a fresh worker that never loaded a LoRA."""
    return run(tiny_engine(model_cache, lora_dir), bucket())


def test_a_lora_changes_the_pixels_and_at_scale_zero_changes_none(
    engine: Engine, base: list[Image]
) -> None:
    inked = run(engine, bucket(("ink", 1.0)))
    zero = run(engine, bucket(("ink", 0.0)))

    assert distance(inked, base) > 1.0
    assert distance(zero, base) == 0.0


def test_base_after_a_lora_batch_equals_a_fresh_workers_base(
    engine: Engine, base: list[Image]
) -> None:
    run(engine, bucket(("ink", 1.0), ("neon", 0.5)))

    after = run(engine, bucket())

    assert distance(after, base) == 0.0


def test_two_loras_in_one_set_each_at_its_scale(engine: Engine, base: list[Image]) -> None:
    ink = run(engine, bucket(("ink", 0.8)))
    neon = run(engine, bucket(("neon", 0.8)))
    both = run(engine, bucket(("ink", 0.8), ("neon", 0.8)))
    ink_alone_in_a_set = run(engine, bucket(("ink", 0.8), ("neon", 0.0)))
    stronger = run(engine, bucket(("ink", 1.6), ("neon", 0.8)))

    assert min(distance(both, ink), distance(both, neon), distance(ink, neon)) > 0.5
    assert distance(ink_alone_in_a_set, ink) == 0.0
    assert distance(stronger, both) > 0.5
    # Within a set each scale counts: doubling one moves the image further from the base.
    assert distance(stronger, base) > distance(both, base)


def test_switching_sets_loads_each_file_once_and_never_touches_the_base_weights(
    model_cache: Path, lora_dir: Path
) -> None:
    engine = tiny_engine(model_cache, lora_dir)
    unet = engine.pipe.unet
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in unet.named_parameters()}
    first = run(engine, bucket(("ink", 1.0)))

    for loras in [(("neon", 1.0),), (), (("ink", 1.0), ("neon", 1.0)), (("ink", 1.0),)]:
        last = run(engine, bucket(*loras))

    assert engine.adapters is not None
    assert engine.adapters.loads == 2
    assert distance(last, first) == 0.0
    # Each base weight is the same tensor with the same values; only adapter layers were added.
    after = dict(unet.named_parameters())
    base_names = {name for name in after if "lora" not in name}
    assert {n.replace(".base_layer", "") for n in base_names} == set(before)
    for name in base_names:
        pointer, value = before[name.replace(".base_layer", "")]
        assert after[name].data_ptr() == pointer, name
        assert torch.equal(after[name], value), name


def test_the_cache_keeps_the_recently_used_loras_within_its_budget(
    model_cache: Path, lora_dir: Path
) -> None:
    engine = tiny_engine(model_cache, lora_dir, budget=TINY_LORA_BYTES)
    inked = run(engine, bucket(("ink", 1.0)))

    run(engine, bucket(("neon", 1.0)))  # ink is evicted to make room
    again = run(engine, bucket(("ink", 1.0)))  # and loaded again

    assert engine.adapters is not None
    assert (engine.adapters.loads, list(engine.adapters.loaded)) == (3, ["ink"])
    assert distance(again, inked) == 0.0
    # A set larger than the budget still runs: the cache holds what the batch needs.
    run(engine, bucket(("ink", 1.0), ("neon", 1.0)))
    assert list(engine.adapters.loaded) == ["ink", "neon"]


def test_a_lora_of_another_family_fails_its_batch_and_the_next_batch_is_clean(
    model_cache: Path, lora_dir: Path, base: list[Image]
) -> None:
    engine = tiny_engine(model_cache, lora_dir)
    inked = run(engine, bucket(("ink", 1.0)))

    with pytest.raises(AdapterError) as raised:
        run(engine, bucket(("wide", 1.0)))

    assert raised.value.code == "lora_failed"
    assert raised.value.message.startswith("LoRA 'wide' could not be loaded: ")
    assert distance(run(engine, bucket()), base) == 0.0
    assert distance(run(engine, bucket(("ink", 1.0))), inked) == 0.0


def test_an_unknown_lora_fails_its_batch(engine: Engine) -> None:
    # The gateway checks names against the same folder; a worker with another folder says so.
    with pytest.raises(AdapterError, match="unknown LoRA 'gone': this worker's LoRA folder has"):
        run(engine, bucket(("gone", 1.0)))


def test_an_engine_without_a_lora_catalog_refuses_loras(model_cache: Path) -> None:
    engine = Engine(load_pipeline("tiny", model_cache, device="cpu"))

    with pytest.raises(AdapterError, match="this model takes no LoRAs"):
        run(engine, bucket(("ink", 1.0)))


def test_tiny_sd2_takes_its_own_lora(model_cache: Path, lora_dir: Path) -> None:
    engine = tiny_engine(model_cache, lora_dir, model="tiny-sd2")
    assert engine.pipe.scheduler.config.prediction_type == "v_prediction"
    sd2 = Bucket(64, 64, 3, 7.5, model="tiny-sd2")
    plain = run(engine, sd2)

    wide = run(engine, Bucket(64, 64, 3, 7.5, model="tiny-sd2", loras=(("wide", 1.0),)))
    back = run(engine, sd2)

    assert distance(wide, plain) > 1.0
    assert distance(back, plain) == 0.0
    with pytest.raises(AdapterError, match="LoRA 'ink' could not be loaded"):
        run(engine, Bucket(64, 64, 3, 7.5, model="tiny-sd2", loras=(("ink", 1.0),)))


@pytest.mark.slow
def test_the_adapters_bench_runs_and_writes_its_figures(tmp_path: Path, model_cache: Path) -> None:
    from bench.__main__ import main

    argv = ["--adapters", f"--out={tmp_path}", f"--model-cache={model_cache}", "--steps=2"]
    assert main([*argv, "--repeats=1", "--gpu-batches=2"]) == 0

    figures = json.loads((tmp_path / "adapters.json").read_text())
    assert sorted(figures["lora"]) == [
        "base_batch_ms",
        "same_set_batch_ms",
        "switch_cached_alone_ms",
        "switch_cached_batch_ms",
        "switch_from_file_alone_ms",
        "switch_from_file_batch_ms",
        "switch_off_alone_ms",
    ]
    assert figures["tasks"]["batch_2"]["txt2img_vs_txt2img"] == 1.0
    assert all(v > 0 for v in figures["tasks"]["batch_2"].values())


# --- StepAdapters: the step engine's intake and loop threads sharing one pipeline's LoRAs ---


class Recorded:
    """`Adapters` as `StepAdapters` uses them: the sets made active, in order."""

    def __init__(self, fails: str = "") -> None:
        self.active: tuple[tuple[str, float], ...] | None = ()
        self.used: list[tuple[tuple[str, float], ...]] = []
        self.fails = fails

    def use(self, loras: Sequence[tuple[str, float]]) -> None:
        """Switch, or fail half way for a set naming `fails`."""
        self.active = None
        if any(name == self.fails for name, _ in loras):
            raise AdapterError(f"LoRA {self.fails!r} could not be loaded: broken")
        self.active = tuple(loras)
        self.used.append(self.active)


INK = (("ink", 1.0),)
NEON = (("neon", 1.0),)


class Holder:
    """A thread that holds a set until told to let go."""

    def __init__(self, shared: StepAdapters, loras: tuple[tuple[str, float], ...]) -> None:
        self.inside, self.go = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(shared, loras), daemon=True)
        self.thread.start()

    def _run(self, shared: StepAdapters, loras: tuple[tuple[str, float], ...]) -> None:
        with shared.hold(loras, "unet"):
            self.inside.set()
            self.go.wait(10)

    def leave(self) -> None:
        """Let go and wait until it has."""
        self.go.set()
        self.thread.join(10)


def waiting(shared: StepAdapters, count: int) -> None:
    """Wait until `count` threads wait for their turn."""
    deadline = time.monotonic() + 10
    while len(shared._line) != count:
        assert time.monotonic() < deadline, "the threads never queued"
        time.sleep(0.001)


def test_step_adapters_switch_only_while_no_thread_holds_a_set_first_come_first_served() -> None:
    adapters = Recorded()
    shared = StepAdapters(cast(Adapters, adapters))
    loop = Holder(shared, INK)
    assert loop.inside.wait(10)
    same = Holder(shared, INK)  # the active set: holds beside it
    assert same.inside.wait(10)
    intake = Holder(shared, NEON)  # another set: waits for both to let go
    waiting(shared, 1)
    again = Holder(shared, INK)  # the active set, but behind the thread waiting for another
    waiting(shared, 2)
    loop.leave()
    assert (adapters.active, intake.inside.is_set()) == (INK, False)  # one holder is left
    same.leave()
    assert intake.inside.wait(10)
    assert (adapters.active, again.inside.is_set()) == (NEON, False)
    intake.leave()
    assert again.inside.wait(10)
    again.leave()
    assert adapters.used == [INK, NEON, INK]
    assert (shared.switches, shared._holders, list(shared._line)) == (3, 0, [])


def test_a_set_that_cannot_be_made_active_raises_from_hold_and_the_next_set_is_switched() -> None:
    adapters = Recorded(fails="bad")
    shared = StepAdapters(cast(Adapters, adapters))
    with shared.hold(INK, "text"):
        pass

    with (
        pytest.raises(AdapterError, match="LoRA 'bad' could not be loaded"),
        shared.hold((("bad", 1.0),), "unet"),
    ):
        raise AssertionError("held a set that was never made active")

    with shared.hold(INK, "unet"):  # the failed switch left the adapters unknown: set again
        assert adapters.active == INK
    assert adapters.used == [INK, INK]
    assert (shared._holders, list(shared._line)) == (0, [])


def test_step_adapters_load_loras_the_batch_engine_can_use_after_them(
    model_cache: Path, lora_dir: Path
) -> None:
    engine = tiny_engine(model_cache, lora_dir)
    inked = run(engine, bucket(("ink", 1.0)))
    fresh = tiny_engine(model_cache, lora_dir)
    assert fresh.adapters is not None
    shared = StepAdapters(fresh.adapters)

    with torch.inference_mode(), shared.hold(INK, "unet"):  # as on the step loop's thread
        pass

    # Loaded as inference tensors, the batch engine could not load another LoRA beside ink.
    run(fresh, bucket(("neon", 1.0)))
    assert distance(run(fresh, bucket(("ink", 1.0))), inked) == 0.0
