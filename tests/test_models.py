"""worker.models against the real diffusers pipeline and the tiny model, on the CPU."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image

from core.catalog import Catalog
from core.errors import ConfigError
from core.jobs import Bucket
from core.settings import Settings
from worker import models
from worker.inference import Engine, Row, UnsupportedTask, WrongModel, load_engine
from worker.models import (
    build_tiny,
    build_tiny_sd2,
    load_pipeline,
    model_limits,
    resolve_device,
    resolve_dtype,
    set_cpu_threads,
)

TINY_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The model on one thread, as the tests' workers run it: two threads on a shared two-core
    machine spin against each other and make every call ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache shared by this module's tests, empty before the first load."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> StableDiffusionPipeline:
    """The tiny pipeline, built into the shared cache by its first load."""
    pipe = load_pipeline("tiny", cache_dir, device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    return pipe


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    width: int = 64,
    height: int = 64,
) -> list[Image.Image]:
    """Run `pipe` for two steps with one generator per image, as the batch runner does."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    images: list[Image.Image] = pipe(
        prompts, width=width, height=height, num_inference_steps=2, generator=generators
    ).images
    return images


def pixel_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference between two images, on the 0..255 scale."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_tiny_is_built_once_then_loaded_from_the_cache(
    cache_dir: Path, tiny: StableDiffusionPipeline
) -> None:
    folder = cache_dir / "tiny"
    # No staging folder is left beside the published model.
    assert [path.name for path in cache_dir.iterdir()] == ["tiny"]
    assert sorted(files(folder)) == TINY_FILES
    assert sum(len(data) for data in files(folder).values()) < 12_000_000
    written = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}

    again = load_pipeline("tiny", cache_dir, device="cpu")

    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == written
    assert type(again) is StableDiffusionPipeline
    assert again.safety_checker is None
    assert again.config["requires_safety_checker"] is False
    assert again.tokenizer.model_max_length == 77
    assert (again.device, again.dtype) == (torch.device("cpu"), torch.float32)


def test_tiny_weights_are_the_same_on_every_build(
    cache_dir: Path, tiny: StableDiffusionPipeline, tmp_path: Path
) -> None:
    build_tiny(tmp_path / "tiny")

    assert files(tmp_path / "tiny") == files(cache_dir / "tiny")


@pytest.mark.parametrize(("width", "height"), [(64, 64), (64, 72), (72, 64)])
def test_a_call_returns_images_of_the_asked_size(
    tiny: StableDiffusionPipeline, width: int, height: int, capfd: pytest.CaptureFixture[str]
) -> None:
    images = generate(tiny, ["a cat", "a dog"], [1, 2], width=width, height=height)

    assert [(type(image), image.mode, image.size) for image in images] == [
        (Image.Image, "RGB", (width, height)),
        (Image.Image, "RGB", (width, height)),
    ]
    # The progress bar is off: a worker's log is not a terminal.
    assert capfd.readouterr().err == ""


def test_a_seed_gives_the_same_image_alone_and_in_a_batch(tiny: StableDiffusionPipeline) -> None:
    [alone] = generate(tiny, ["a red bicycle"], [1234])
    batch = generate(tiny, ["a blue house", "a red bicycle", "a green tree"], [7, 1234, 99])

    assert pixel_distance(alone, batch[1]) < 1.0
    # Other seeds and prompts do change the image, so the equality above means something.
    assert pixel_distance(alone, batch[0]) > 10.0
    assert pixel_distance(alone, batch[2]) > 10.0


def test_a_local_path_loads_through_the_generic_path(
    cache_dir: Path, tiny: StableDiffusionPipeline, tmp_path: Path
) -> None:
    pipe = load_pipeline(str(cache_dir / "tiny"), tmp_path, device="cpu")

    assert type(pipe) is StableDiffusionPipeline
    assert pipe.safety_checker is None
    assert list(tmp_path.iterdir()) == []
    [ours] = generate(pipe, ["a lighthouse"], [5])
    [theirs] = generate(tiny, ["a lighthouse"], [5])
    assert pixel_distance(ours, theirs) == 0.0


def test_model_limits(tiny: StableDiffusionPipeline) -> None:
    assert model_limits(tiny) == (64, 2048)


def test_racing_builders_leave_one_complete_model(
    cache_dir: Path, tiny: StableDiffusionPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_built = threading.Barrier(2)

    def build_then_wait(path: Path) -> None:
        build_tiny(path)
        # Neither builder publishes before both have built: the race is certain, not likely.
        both_built.wait(timeout=60)

    monkeypatch.setitem(models._BUILDERS, "tiny", build_then_wait)
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(load_pipeline, "tiny", tmp_path, "cpu") for _ in range(2)]
        pipes = [load.result() for load in loads]

    assert [type(pipe) for pipe in pipes] == [StableDiffusionPipeline] * 2
    assert [path.name for path in tmp_path.iterdir()] == ["tiny"]
    assert files(tmp_path / "tiny") == files(cache_dir / "tiny")


def test_a_stray_folder_in_the_models_place_is_reported(tmp_path: Path) -> None:
    (tmp_path / "tiny" / "half-copied").mkdir(parents=True)

    with pytest.raises(ConfigError, match="holds no pipeline: remove it"):
        load_pipeline("tiny", tmp_path, device="cpu")
    assert [path.name for path in tmp_path.iterdir()] == ["tiny"]


def test_sd15_random_has_the_shapes_of_sd15() -> None:
    # On the meta device the 1B parameters cost no memory and no time.
    with torch.device("meta"):
        unet, vae, text_encoder = models._sd15_models(models._char_tokenizer())

    sizes = [sum(p.numel() for p in part.parameters()) for part in (unet, vae, text_encoder)]
    # SD 1.5's own counts; the text encoder's is CLIP ViT-L's 123,060,480 less the token
    # embeddings of the 49,408 - 190 words our character vocabulary does not have.
    assert sizes == [859_520_964, 83_653_863, 123_060_480 - (49_408 - 190) * 768]
    assert unet.config["cross_attention_dim"] == text_encoder.config.hidden_size == 768


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with two CUDA cards of compute capability 8.0 and no MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with neither CUDA nor MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("asked", "device"),
    [
        (None, "cuda"),
        ("auto", "cuda"),
        ("cuda", "cuda"),
        ("cuda:1", "cuda:1"),
        (" CUDA:0 ", "cuda:0"),
        ("cpu", "cpu"),
    ],
)
@pytest.mark.usefixtures("machine")
def test_resolve_device_with_gpus(asked: str | None, device: str) -> None:
    assert resolve_device(asked) == device


@pytest.mark.parametrize(("asked", "device"), [(None, "cpu"), ("auto", "cpu"), ("cpu", "cpu")])
@pytest.mark.usefixtures("cpu_only")
def test_resolve_device_without_gpus(asked: str | None, device: str) -> None:
    assert resolve_device(asked) == device


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ("gpu", "unknown device 'gpu': set DQ_DEVICE to auto, cpu, cuda:N or mps"),
        ("cuda:", "unknown device 'cuda:'"),
        ("cuda:one", "unknown device 'cuda:one'"),
        ("cuda:2", "device 'cuda:2' is not available here: set DQ_DEVICE to auto or cpu"),
        ("mps", "device 'mps' is not available here"),
    ],
)
@pytest.mark.usefixtures("machine")
def test_resolve_device_refuses(asked: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_device(asked)
    assert raised.value.message.startswith(message)


@pytest.mark.usefixtures("cpu_only")
def test_resolve_device_refuses_cuda_without_gpus() -> None:
    with pytest.raises(ConfigError, match="'cuda' is not available here"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("device", "asked", "capability", "dtype"),
    [
        ("cpu", None, (8, 0), torch.float32),
        ("cpu", "auto", (8, 0), torch.float32),
        ("cpu", "bf16", (8, 0), torch.bfloat16),
        ("cuda", None, (8, 0), torch.bfloat16),
        ("cuda:1", None, (9, 0), torch.bfloat16),
        ("cuda", None, (7, 5), torch.float16),
        ("cuda", "fp32", (9, 0), torch.float32),
        ("cuda", " FP16 ", (9, 0), torch.float16),
        ("mps", None, (8, 0), torch.float16),
    ],
)
def test_resolve_dtype(
    device: str,
    asked: str | None,
    capability: tuple[int, int],
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    assert resolve_dtype(device, asked) == dtype


@pytest.mark.parametrize("asked", ["float16", "int8", ""])
def test_resolve_dtype_refuses(asked: str) -> None:
    with pytest.raises(ConfigError, match="set DQ_DTYPE to fp32, fp16 or bf16"):
        resolve_dtype("cpu", asked)


def test_set_cpu_threads() -> None:
    before = torch.get_num_threads()
    try:
        set_cpu_threads(None)
        assert torch.get_num_threads() == before
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match="at least 1"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


# --- tiny-sd2, and the img2img and inpaint twins of a loaded pipeline ---------------------------


def test_tiny_sd2_is_shaped_like_sd2_and_built_the_same_every_time(
    cache_dir: Path, tiny: StableDiffusionPipeline, tmp_path: Path
) -> None:
    sd2 = load_pipeline("tiny-sd2", cache_dir, device="cpu")
    build_tiny_sd2(tmp_path / "again")

    assert type(sd2) is StableDiffusionPipeline
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert tiny.scheduler.config.prediction_type == "epsilon"
    # What makes it another family: its UNet reads a wider text embedding, through linear
    # projections, so neither model's LoRAs fit the other.
    shapes = [
        (p.unet.config.cross_attention_dim, p.text_encoder.config.hidden_size) for p in (tiny, sd2)
    ]
    assert shapes == [(32, 32), (64, 64)]
    assert (tiny.unet.config.use_linear_projection, sd2.unet.config.use_linear_projection) == (
        False,
        True,
    )
    assert files(tmp_path / "again") == files(cache_dir / "tiny-sd2")
    [image] = generate(sd2, ["a lighthouse"], [5])
    assert image.size == (64, 64)


@pytest.fixture(scope="module")
def engine(cache_dir: Path, tiny: StableDiffusionPipeline) -> Engine:
    """A worker's engine for tiny, loaded from its catalog entry."""
    spec = Catalog.from_settings(Settings(model="tiny")).get(None)
    return load_engine(spec, cache_dir)


def picture(seed: int) -> Image.Image:
    """A smooth random 64 x 64 picture: blocks of colour, blurred by the upscale."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    return small.resize((64, 64), Image.Resampling.BILINEAR)


def half_mask() -> Image.Image:
    """White (paint) over the right half, black (keep) over the left."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    return Image.fromarray(mask)


def edit(
    engine: Engine, task: str, strength: float, rows: Sequence[Row], steps: int = 10
) -> tuple[list[Image.Image], list[int]]:
    """One img2img or inpaint batch, and the progress it reported."""
    progress: list[int] = []
    b = Bucket(64, 64, steps, 7.5, model="tiny", task=task, strength=strength)
    images = engine.generate(rows, b, lambda step: progress.append(step) or True)
    return images, progress


def test_img2img_and_inpaint_share_the_loaded_weights(engine: Engine) -> None:
    twins = [engine.pipe_for("img2img"), engine.pipe_for("inpaint")]

    assert [type(t).__name__ for t in twins] == [
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert all(getattr(t, part) is getattr(engine.pipe, part) for t in twins), part
    assert engine.pipe_for("img2img") is twins[0]  # made once


def test_img2img_follows_the_input_more_at_low_strength(engine: Engine) -> None:
    # With random weights the VAE does not reproduce its input, so every output is about as far
    # from the input image as any other (a mean of about 88 here, whatever the strength). What
    # strength does control is how much of the output the input decides: two different inputs
    # with the same seed and prompt give far more different outputs at 0.3 than at 0.9.
    def spread(strength: float) -> float:
        one, _ = edit(engine, "img2img", strength, [Row("j", 0, "a boat", None, 3, picture(1))])
        two, _ = edit(engine, "img2img", strength, [Row("j", 0, "a boat", None, 3, picture(2))])
        return pixel_distance(one[0], two[0])

    low, high = spread(0.3), spread(0.9)

    assert low > 3 * high
    assert high > 0.0


def test_img2img_runs_the_strengths_share_of_the_steps(engine: Engine) -> None:
    row = Row("j", 0, "a boat", None, 3, picture(1))

    _, low = edit(engine, "img2img", 0.3, [row])
    _, high = edit(engine, "img2img", 0.9, [row])

    # Progress counts the skipped steps as done, so it still ends at the steps asked for.
    assert (low, high) == ([8, 9, 10], [2, 3, 4, 5, 6, 7, 8, 9, 10])


def test_an_img2img_row_is_the_same_alone_and_in_a_batch(engine: Engine) -> None:
    rows = [Row("a", 0, "a boat", None, 3, picture(1)), Row("b", 0, "a cat", "fog", 4, picture(2))]

    batch, _ = edit(engine, "img2img", 0.6, rows, steps=5)
    alone, _ = edit(engine, "img2img", 0.6, rows[1:], steps=5)

    assert pixel_distance(batch[1], alone[0]) < 1.0
    assert pixel_distance(batch[0], batch[1]) > 10.0


def test_inpaint_keeps_the_input_outside_the_mask(engine: Engine) -> None:
    original = picture(1)
    row = Row("j", 0, "a boat", None, 3, original, half_mask())

    [made], progress = edit(engine, "inpaint", 1.0, [row], steps=4)

    ours, theirs = np.asarray(made, dtype=np.float64), np.asarray(original, dtype=np.float64)
    assert np.abs(ours[:, :32] - theirs[:, :32]).mean() == 0.0
    assert np.abs(ours[:, 32:] - theirs[:, 32:]).mean() > 10.0
    assert progress == [1, 2, 3, 4]


def test_an_input_of_another_size_is_fitted_to_the_bucket(engine: Engine) -> None:
    wide = picture(1).resize((96, 64))

    [made], _ = edit(engine, "img2img", 0.5, [Row("j", 0, "a boat", None, 3, wide)], steps=2)

    assert made.size == (64, 64)


def test_a_task_the_model_does_not_do_is_refused(engine: Engine) -> None:
    assert engine.spec is not None
    text_only = Engine(engine.pipe, dataclasses.replace(engine.spec, tasks=("txt2img",)))

    with pytest.raises(UnsupportedTask, match="model tiny does not do img2img"):
        edit(text_only, "img2img", 0.5, [Row("j", 0, "a boat", None, 3, picture(1))])


def test_a_batch_for_another_model_is_refused(engine: Engine) -> None:
    with pytest.raises(WrongModel, match="a batch for model tiny-sd2 reached a tiny worker"):
        engine.generate([Row("j", 0, "a boat", None, 3)], Bucket(64, 64, 2, 7.5, "tiny-sd2"), bool)
