"""The model and LoRA catalogs, and the request check the gateway runs against them (no torch)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from core.catalog import (
    Catalog,
    Defaults,
    DefaultsView,
    ModelSpec,
    ModelView,
    load_catalog,
    public_models,
)
from core.choice import Ask, Checked, LoraUse, check_request
from core.errors import ConfigError, ValidationFailed
from core.loras import LoraCatalog, LoraFile
from core.settings import Settings
from worker.models import build_tiny, build_tiny_lora, build_tiny_sd2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "models.example.toml"
# The tiny LoRA: rank 4 on q, k, v and out of each of the tiny UNet's 6 attention blocks' 2
# attentions, fp32; its byte count is what the worker's LoRA cache budgets.
TINY_LORA_BYTES = 92_160


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two LoRAs for tiny (SD 1.x-shaped) and one for tiny-sd2, built here."""
    folder = tmp_path_factory.mktemp("loras")
    build_tiny_lora(folder / "ink.safetensors", "tiny", seed=1)
    build_tiny_lora(folder / "neon.safetensors", "tiny", seed=2)
    build_tiny_lora(folder / "wide.safetensors", "tiny-sd2", seed=1)
    return folder


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory: pytest.TempPathFactory, lora_dir: Path) -> Path:
    """A catalog of tiny and tiny-sd2, with the LoRA folder beside it."""
    folder = tmp_path_factory.mktemp("deploy")
    shutil.copytree(lora_dir, folder / "loras")
    path = folder / "models.toml"
    path.write_text(
        """
default = "tiny"
lora_folder = "loras"

[models.tiny]
source = "tiny"
max_side = 128

[models.tiny.defaults]
width = 64
height = 64
steps = 4

[models.tiny-sd2]
source = "tiny-sd2"
sizes = ["64x64", "96x64"]
tasks = ["txt2img", "img2img"]
max_steps = 20
min_workers = 0
max_workers = 3
"""
    )
    return path


@pytest.fixture(scope="module")
def catalog(catalog_file: Path) -> Catalog:
    """The catalog file, loaded with default settings."""
    return load_catalog(catalog_file, Settings())


def write_catalog(tmp_path: Path, text: str) -> Path:
    """A catalog file with `text`."""
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


# --- the catalog file ---------------------------------------------------------------------------


def test_a_catalog_file_gives_each_model_its_spec(catalog: Catalog, lora_dir: Path) -> None:
    assert catalog.default == "tiny"
    assert catalog.models == {
        "tiny": ModelSpec(
            name="tiny",
            source="tiny",
            family="sd1",
            tasks=("txt2img", "img2img", "inpaint"),
            max_side=128,
            defaults=Defaults(width=64, height=64, steps=4),
        ),
        "tiny-sd2": ModelSpec(
            name="tiny-sd2",
            source="tiny-sd2",
            family="sd2",
            tasks=("txt2img", "img2img"),
            sizes=((64, 64), (96, 64)),
            max_steps=20,
            defaults=Defaults(width=64, height=64, steps=20),
            min_workers=0,
            max_workers=3,
        ),
    }
    assert sorted(catalog.loras.files) == ["ink", "neon", "wide"]


def test_settings_are_the_defaults_of_every_entry(catalog_file: Path) -> None:
    settings = Settings(
        device="cpu", dtype="fp32", max_batch_size=8, max_batch_pixels=65536, scaler_max=4
    )

    spec = load_catalog(catalog_file, settings).models["tiny"]

    assert (spec.device, spec.dtype, spec.max_batch_size, spec.max_batch_pixels) == (
        "cpu",
        "fp32",
        8,
        65536,
    )
    assert (spec.min_workers, spec.max_workers) == (1, 4)


def test_the_example_catalog_parses(tmp_path: Path, lora_dir: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "models.toml")
    shutil.copytree(lora_dir, tmp_path / "loras")

    catalog = load_catalog(tmp_path / "models.toml", Settings())

    assert catalog.default == "sd15"
    assert catalog.models["sd15"] == ModelSpec(
        name="sd15",
        source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        family="sd1",
        tasks=("txt2img", "img2img", "inpaint"),
        device="cuda",
        dtype="fp16",
        max_batch_size=8,
        max_batch_pixels=2097152,
        min_side=256,
        max_side=768,
        min_steps=1,
        max_steps=50,
        defaults=Defaults(512, 512, 25, 7.5, 0.8),
        input_resize="cover",
        min_workers=0,
        max_workers=2,
    )
    turbo = catalog.models["sdxl-turbo"]
    assert (turbo.family, turbo.sizes, turbo.max_steps) == ("sdxl", ((512, 512),), 4)
    assert turbo.defaults == Defaults(512, 512, 1, 0.0, 0.5)
    assert catalog.models["tiny"].defaults == Defaults(64, 64, 10, 7.5, 0.8)
    assert sorted(catalog.loras.files) == ["ink", "neon", "wide"]


def test_dq_model_alone_is_a_catalog_of_one() -> None:
    settings = Settings(model="tiny", max_batch_size=2, scaler_min=0, scaler_max=3)

    catalog = Catalog.from_settings(settings)

    assert catalog.default == "tiny"
    assert catalog.models == {
        "tiny": ModelSpec(
            name="tiny",
            source="tiny",
            family="sd1",
            tasks=("txt2img", "img2img", "inpaint"),
            max_batch_size=2,
            defaults=Defaults(64, 64, 10),  # a test model: a first request takes a second
            min_workers=0,
            max_workers=3,
        )
    }
    assert catalog.loras.files == {}


def test_dq_model_alone_as_a_hub_id_serves_text_to_image() -> None:
    catalog = Catalog.from_settings(Settings(model="someone/some-model"))

    spec = catalog.get(None)
    # Named as jobs, queues and Redis keys can carry it: the Hub id's '/' becomes '-'.
    expected = ("someone-some-model", "someone/some-model", "other", ("txt2img",))
    assert (spec.name, spec.source, spec.family, spec.tasks) == expected


@pytest.mark.parametrize(("build", "family"), [(build_tiny, "sd1"), (build_tiny_sd2, "sd2")])
def test_a_local_folder_is_named_after_itself_and_its_family_read_from_it(
    tmp_path: Path, build: object, family: str
) -> None:
    folder = tmp_path / "checkpoints" / "my-model"
    build(folder)  # type: ignore[operator]

    spec = Catalog.from_settings(Settings(model=str(folder))).get(None)

    assert (spec.name, spec.source, spec.family) == ("my-model", str(folder), family)


def test_dq_models_with_dq_loras_reads_that_folder(catalog_file: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    build_tiny_lora(tmp_path / "other" / "solo.safetensors")

    catalog = Catalog.from_settings(Settings(models=catalog_file, loras=tmp_path / "other"))

    assert list(catalog.loras.files) == ["solo"]


ENTRY = '[models.sd]\nsource = "org/model"\nfamily = "sd1"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[models.sd\nsource = 1",
            "is not valid TOML: Expected ']' at the end of a table declaration (at line 1,"
            " column 11)",
        ),
        (
            ENTRY + "max_batch = 4\n",
            "[models.sd] max_batch: is not a key an entry may have (did you mean max_batch_size?)",
        ),
        (
            '[models.sd]\nfamily = "sd1"\n',
            '[models.sd] source: is missing; write source = "stabilityai/sdxl-turbo" (a diffusers'
            " id, a local folder, or tiny)",
        ),
        (
            '[models.sd]\nsource = "org/model"\nfamily = "sd3"\n',
            "[models.sd] family: Input should be 'sd1', 'sd2', 'sdxl' or 'other'; write family ="
            ' "sd1" (sd1, sd2, sdxl or other)',
        ),
        (
            '[models.sd]\nsource = "org/model"\n',
            "[models.sd] family: cannot tell it from 'org/model'; write family = \"sd1\"",
        ),
        (
            ENTRY + "max_batch_size = 0\n",
            "[models.sd] max_batch_size: Input should be greater than or equal to 1; write"
            " max_batch_size = 4",
        ),
        (
            ENTRY + 'sizes = ["500x500"]\n',
            "[models.sd] sizes: '500x500' is not WIDTHxHEIGHT in multiples of 8 from 64; write"
            ' sizes = ["512x512", "768x512"]',
        ),
        (ENTRY + "min_side = 512\nmax_side = 256\n", "[models.sd] min_side 512 is above max_side"),
        (
            ENTRY + "max_side = 256\n[models.sd.defaults]\nwidth = 512\n",
            "[models.sd] defaults: width must be a multiple of 8 from 64 to 256 for model sd,"
            " not 512",
        ),
        (
            '[models.x]\nsource = "org/x"\nfamily = "other"\ntasks = ["img2img"]\n',
            "[models.x] tasks: img2img and inpaint need a known family",
        ),
        (
            '[models."sd 15"]\nsource = "tiny"\n',
            "[models.sd 15] is not a usable model name",
        ),
        ('default = "sdxl"\n' + ENTRY, "default: no model is called 'sdxl'; write default ="),
        ('default = "sd"\n', 'models: is missing; write [models.NAME] source = "tiny"'),
        (ENTRY + "[loras]\n", "loras: is not a top-level key (default, lora_folder,"),
    ],
)
def test_catalog_errors_name_the_entry_and_what_to_write(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write_catalog(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_catalog(path, Settings())

    assert raised.value.message.startswith(f"DQ_MODELS={path}")
    assert message in raised.value.message


def test_every_error_of_a_file_is_listed_at_once(tmp_path: Path) -> None:
    path = write_catalog(
        tmp_path, '[models.a]\nsource = "tiny"\nmax_steps = 0\n[models.b]\nfamily = "sd1"\n'
    )

    with pytest.raises(ConfigError) as raised:
        load_catalog(path, Settings())

    assert raised.value.message == (
        f"DQ_MODELS={path} has errors:\n"
        "  [models.a] max_steps: Input should be greater than or equal to 1; write max_steps = 50\n"
        '  [models.b] source: is missing; write source = "stabilityai/sdxl-turbo" (a diffusers'
        " id, a local folder, or tiny)"
    )


def test_a_missing_catalog_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models.toml: cannot read it \(No such file"):
        Catalog.from_settings(Settings(models=tmp_path / "models.toml"))


# --- the LoRA folder ----------------------------------------------------------------------------


def test_the_lora_folder_lists_each_file_with_its_family(lora_dir: Path) -> None:
    loras = LoraCatalog.scan(lora_dir)

    assert loras.files == {
        "ink": LoraFile("ink", lora_dir / "ink.safetensors", "sd1", TINY_LORA_BYTES),
        "neon": LoraFile("neon", lora_dir / "neon.safetensors", "sd1", TINY_LORA_BYTES),
        "wide": LoraFile("wide", lora_dir / "wide.safetensors", "sd2", 98_304),
    }
    assert loras.for_family("sd1") == ["ink", "neon"]


def safetensors_file(path: Path, tensors: dict[str, list[int]], metadata: dict[str, str]) -> None:
    """A safetensors file with zero-filled float32 tensors of the given shapes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
KOHYA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"


@pytest.mark.parametrize(
    ("tensors", "metadata", "family"),
    [
        ({f"{KEY}.lora_A.weight": [4, 768]}, {}, "sd1"),
        ({f"{KEY}.lora.down.weight": [4, 1024]}, {}, "sd2"),
        ({KOHYA: [8, 2048]}, {}, "sdxl"),
        ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": [4, 1280]}, {}, "sdxl"),
        ({KOHYA: [4, 32]}, {"ss_base_model_version": "sd_v1"}, "sd1"),
        ({KOHYA: [4, 32]}, {"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
        ({KOHYA: [4, 32]}, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({KOHYA: [4, 768]}, {"dq.family": "sd2"}, "sd2"),
    ],
)
def test_a_loras_family_comes_from_its_metadata_or_its_shapes(
    tmp_path: Path, tensors: dict[str, list[int]], metadata: dict[str, str], family: str
) -> None:
    safetensors_file(tmp_path / "style.safetensors", tensors, metadata)

    [found] = LoraCatalog.scan(tmp_path).files.values()

    assert (found.name, found.family) == ("style", family)


def test_a_lora_of_unknown_family_is_refused_unless_the_catalog_names_it(tmp_path: Path) -> None:
    safetensors_file(tmp_path / "mystery.safetensors", {KOHYA: [4, 32]}, {})

    with pytest.raises(ConfigError) as raised:
        LoraCatalog.scan(tmp_path)
    assert raised.value.message == (
        f"cannot tell which model family LoRA file {tmp_path / 'mystery.safetensors'} is for:"
        ' add it to the catalog file as [lora_families] "mystery" = "sd1" (or sd2, sdxl)'
    )
    assert LoraCatalog.scan(tmp_path, {"mystery": "sdxl"}).files["mystery"].family == "sdxl"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("junk.safetensors", b"not a safetensors file", "is not a safetensors file"),
        ("short.safetensors", b"\x01", "is not a safetensors file (it is too short)"),
        ("huge.safetensors", struct.pack("<Q", 2**40), "(its header is too long)"),
        ("bad json.safetensors", b"", "are not usable names: rename them"),
    ],
)
def test_a_bad_lora_file_is_named(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)

    with pytest.raises(ConfigError) as raised:
        LoraCatalog.scan(tmp_path)

    assert message in raised.value.message


def test_lora_families_must_name_files_in_the_folder(lora_dir: Path) -> None:
    with pytest.raises(ConfigError, match="lora_families names gone, which are not files in"):
        LoraCatalog.scan(lora_dir, {"gone": "sd1"})


def test_a_missing_lora_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist: create it or fix DQ_LORAS"):
        LoraCatalog.scan(tmp_path / "nowhere")


# --- the request check --------------------------------------------------------------------------


def test_an_accepted_request_gets_the_models_defaults(catalog: Catalog) -> None:
    ask = Ask(task="img2img", image="upload:up_1", loras=[LoraUse("neon", 0.5), LoraUse("ink")])

    checked = check_request(catalog, ask)

    assert checked == Checked(
        spec=catalog.models["tiny"],
        task="img2img",
        loras=(("ink", 1.0), ("neon", 0.5)),
        width=64,
        height=64,
        steps=4,
        strength=0.8,
    )


def test_a_request_may_name_its_model_and_inpaint(catalog: Catalog) -> None:
    ask = Ask(model="tiny-sd2", width=96, height=64, loras=[LoraUse("wide", -1.0)])

    checked = check_request(catalog, ask)

    assert (checked.spec.name, checked.loras, checked.width, checked.steps) == (
        "tiny-sd2",
        (("wide", -1.0),),
        96,
        20,
    )
    inpaint = check_request(catalog, Ask(task="inpaint", image="x", mask="y", strength=1.0))
    assert (inpaint.task, inpaint.strength) == ("inpaint", 1.0)


@pytest.mark.parametrize(
    ("ask", "field", "code", "message"),
    [
        (
            Ask(model="sdxl"),
            "model",
            "unknown_model",
            "unknown model 'sdxl': this deployment serves tiny, tiny-sd2",
        ),
        (
            Ask(loras=[LoraUse("gone")]),
            "loras[0].name",
            "unknown_lora",
            "unknown LoRA 'gone': model tiny takes ink, neon",
        ),
        (
            Ask(loras=[LoraUse("ink"), LoraUse("wide")]),
            "loras[1].name",
            "lora_family_mismatch",
            "LoRA 'wide' is made for sd2 models and model tiny is sd1",
        ),
        (
            Ask(model="tiny-sd2", loras=[LoraUse("ink")]),
            "loras[0].name",
            "lora_family_mismatch",
            "LoRA 'ink' is made for sd1 models and model tiny-sd2 is sd2",
        ),
        (
            Ask(loras=[LoraUse("ink", 0.5), LoraUse("ink", 1.0)]),
            "loras[1].name",
            "validation_error",
            "LoRA 'ink' is named twice",
        ),
        (
            Ask(loras=[LoraUse("ink", 9.0)]),
            "loras[0].scale",
            "validation_error",
            "a LoRA's scale must be from -4.0 to 4.0, not 9.0",
        ),
        (
            Ask(loras=[LoraUse("ink")] * 5),
            "loras",
            "validation_error",
            "at most 4 LoRAs per request",
        ),
        (
            Ask(model="tiny-sd2", task="inpaint", image="x", mask="y"),
            "task",
            "unsupported_task",
            "model tiny-sd2 does not do inpaint; it does txt2img, img2img",
        ),
        (Ask(task="upscale"), "task", "validation_error", "task must be one of txt2img, img2img"),
        (
            Ask(image="x"),
            "image",
            "validation_error",
            "txt2img takes no image: set task to img2img or inpaint",
        ),
        (Ask(task="img2img"), "image", "validation_error", "img2img needs an image"),
        (Ask(task="inpaint", image="x"), "mask", "validation_error", "inpaint needs a mask"),
        (
            Ask(task="img2img", image="x", mask="y"),
            "mask",
            "validation_error",
            "only inpaint takes a mask",
        ),
        (
            Ask(strength=0.5),
            "strength",
            "validation_error",
            "strength applies to img2img and inpaint only",
        ),
        (
            Ask(task="img2img", image="x", steps=4, strength=0.2),
            "strength",
            "validation_error",
            "strength 0.2 of 4 steps leaves no step to run: raise strength or steps",
        ),
        (
            Ask(model="tiny-sd2", width=128, height=128),
            "width",
            "validation_error",
            "model tiny-sd2 makes 64x64, 96x64, not 128x128",
        ),
        (
            Ask(width=64, height=200),
            "height",
            "validation_error",
            "height must be a multiple of 8 from 64 to 128 for model tiny, not 200",
        ),
        (
            Ask(steps=151),
            "steps",
            "validation_error",
            "steps must be from 1 to 150 for model tiny, not 151",
        ),
    ],
)
def test_a_refused_request_names_the_field(
    catalog: Catalog, ask: Ask, field: str, code: str, message: str
) -> None:
    with pytest.raises(ValidationFailed) as raised:
        check_request(catalog, ask)

    assert (raised.value.field, raised.value.code, raised.value.status) == (field, code, 422)
    assert raised.value.message.startswith(message)


def test_a_model_of_another_family_takes_no_loras(lora_dir: Path) -> None:
    catalog = Catalog.from_settings(Settings(model="someone/some-model", loras=lora_dir))

    with pytest.raises(ValidationFailed) as raised:
        check_request(catalog, Ask(loras=[LoraUse("ink")]))

    assert (raised.value.field, raised.value.message) == (
        "loras",
        "model someone-some-model takes no LoRAs (its family is other)",
    )


def test_the_pixel_budget_bounds_one_image(catalog_file: Path) -> None:
    catalog = load_catalog(catalog_file, Settings(max_batch_pixels=64 * 96))

    check_request(catalog, Ask(width=64, height=96))
    with pytest.raises(ValidationFailed, match="96x96 is more than model tiny's 6144 pixels"):
        check_request(catalog, Ask(width=96, height=96))


# --- the public listing, and what the gateway imports -------------------------------------------


def test_the_public_listing_shows_what_a_client_may_ask(catalog: Catalog) -> None:
    assert public_models(catalog) == [
        ModelView(
            name="tiny",
            default=True,
            family="sd1",
            tasks=["txt2img", "img2img", "inpaint"],
            sizes=None,
            min_side=64,
            max_side=128,
            max_pixels=Settings().max_batch_pixels,
            min_steps=1,
            max_steps=150,
            defaults=DefaultsView(width=64, height=64, steps=4, guidance_scale=7.5, strength=0.8),
            loras=["ink", "neon"],
        ),
        ModelView(
            name="tiny-sd2",
            default=False,
            family="sd2",
            tasks=["txt2img", "img2img"],
            sizes=["64x64", "96x64"],
            min_side=64,
            max_side=2048,
            max_pixels=Settings().max_batch_pixels,
            min_steps=1,
            max_steps=20,
            defaults=DefaultsView(width=64, height=64, steps=20, guidance_scale=7.5, strength=0.8),
            loras=["wide"],
        ),
    ]
    # Where a model comes from (a server path, perhaps) is never shown.
    assert "source" not in ModelView.model_fields


def test_the_catalogs_load_without_torch(catalog_file: Path) -> None:
    code = (
        "import sys\n"
        "from core.catalog import Catalog\n"
        "from core.choice import check_request\n"
        "from core.settings import Settings\n"
        f"Catalog.from_settings(Settings(models={str(catalog_file)!r}))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
