"""Diffusion pipelines: the random-weight ones we build ourselves, and loading any model to run."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

# Imported from their modules, not the package root: there mypy sees only placeholder classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.auto_pipeline import AutoPipelineForText2Image
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from core.catalog import BUILT_IN_FAMILIES
from core.errors import ConfigError
from core.loras import FAMILY_KEY

log = logging.getLogger(__name__)

MIN_SIDE = 64
# Past this, attention memory rather than the model is what breaks; settings may lower it further.
MAX_SIDE = 2048
# CLIP's context length: the pipeline pads and truncates every prompt to it.
PROMPT_TOKENS = 77

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# torch's global RNG is process-wide: two threads seeding it and drawing at once would interleave
# their draws, and the "deterministic" weights would depend on scheduling. Loads take it too: with
# accelerate installed (peft brings it), from_pretrained builds modules under accelerate's
# init_empty_weights, which patches nn.Module process-wide, so a model built on another thread
# meanwhile would get empty (meta) weights.
_SEEDED = threading.Lock()

Models = tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]


def resolve_device(device: str | None) -> str:
    """The torch device to run on: `auto` (or None) picks CUDA when present, else the CPU."""
    if device is None or device.strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = device.strip().lower()
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"unknown device {device!r}: set DQ_DEVICE to auto, cpu, cuda:N or mps")
    if not _available(name):
        raise ConfigError(f"device {device!r} is not available here: set DQ_DEVICE to auto or cpu")
    return name


def _available(device: str) -> bool:
    """Whether this machine has `device` (already known to be well-formed)."""
    if device == "cpu":
        return True
    if device == "mps":
        return torch.backends.mps.is_available()
    index = int(device.partition(":")[2] or 0)
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def resolve_dtype(device: str, dtype: str | None) -> torch.dtype:
    """The weights' dtype: the one named, or the fastest safe default for `device`."""
    if dtype is None or dtype.strip().lower() == "auto":
        return _default_dtype(device)
    try:
        return _DTYPES[dtype.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}: set DQ_DTYPE to fp32, fp16 or bf16") from None


def _default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA cards that do it natively, fp16 on other GPUs, fp32 on the CPU."""
    if device.startswith("cuda"):
        # Compute capability 8 (Ampere) is where bf16 becomes native; `is_bf16_supported()` also
        # says yes to emulated bf16, which is slower than fp16 on the older cards.
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def set_cpu_threads(n: int | None) -> None:
    """Size torch's intra-op and inter-op CPU thread pools to `n`; None keeps torch's defaults."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"cpu threads must be at least 1, not {n}: fix DQ_CPU_THREADS")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        # The inter-op pool can be sized only once per process, before any parallel work; a later
        # call (a second model load, a test) keeps the first size, which does no harm.
        log.debug("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())


def build_tiny(path: Path) -> None:
    """Write a tiny Stable-Diffusion-shaped pipeline with seeded random weights to `path`."""
    _save_random_pipeline(path, _tiny_models)


def build_tiny_sd2(path: Path) -> None:
    """Write a tiny Stable-Diffusion-2-shaped pipeline (v-prediction) with seeded random weights."""
    _save_random_pipeline(path, _tiny_sd2_models, scheduler=_scheduler("v_prediction"))


def build_sd15_random(path: Path) -> None:
    """Write a Stable Diffusion 1.5-shaped pipeline with seeded random weights to `path`."""
    _save_random_pipeline(path, _sd15_models, torch.float16)


def build_tiny_lora(path: Path, model: str = "tiny", *, seed: int = 0, rank: int = 4) -> None:
    """Write a LoRA with seeded random weights for `model` (tiny or tiny-sd2) to `path`."""
    # Imported here: only this builder needs them, and peft takes a while to import.
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    make_models = _LORA_BASES[model]
    # LoRA B starts at zero by default (a no-op adapter); random B makes the LoRA visible.
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = make_models(_char_tokenizer())[0]
        unet.add_adapter(config)
    # Typed here because diffusers leaves the converter unannotated.
    to_diffusers = cast(
        Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        convert_state_dict_to_diffusers,
    )
    layers = to_diffusers(get_peft_model_state_dict(unet))
    # The diffusers layout (`unet.<module>.lora.down.weight`) that load_lora_weights reads; the
    # family in the metadata is what the LoRA catalog checks requests against.
    tensors = {f"unet.{key}": value.contiguous() for key, value in layers.items()}
    metadata = {"format": "pt", FAMILY_KEY: BUILT_IN_FAMILIES[model], "dq.base_model": model}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def _tiny_models(tokenizer: CLIPTokenizer) -> Models:
    """A UNet, VAE and text encoder small enough to run on a CPU in milliseconds."""
    unet = UNet2DConditionModel(
        # In latent pixels: this VAE halves each side once, so the default image is 64 px.
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = _text_encoder(
        tokenizer, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4
    )
    return unet, vae, text_encoder


def _tiny_sd2_models(tokenizer: CLIPTokenizer) -> Models:
    """The tiny models in SD 2's shape: a wider text embedding, linear attention projections."""
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=2,
        # SD 2 reads OpenCLIP's 1024-wide embedding where SD 1 reads CLIP's 768: so 64 here, 32 in
        # tiny, and a LoRA made for one cannot load into the other.
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = _text_encoder(
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        hidden_act="gelu",
    )
    return unet, vae, text_encoder


def _sd15_models(tokenizer: CLIPTokenizer) -> Models:
    """A UNet, VAE and text encoder (CLIP ViT-L/14's text tower) shaped like SD 1.5's."""
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = _text_encoder(
        tokenizer,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    return unet, vae, text_encoder


def _text_encoder(tokenizer: CLIPTokenizer, **shape: Any) -> CLIPTextModel:
    """A CLIP text encoder over `tokenizer`'s vocabulary, in the given shape."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    return CLIPTextModel(config)


def _char_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the printable ASCII characters: nothing to download."""
    chars = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    tokens = [*chars, *(f"{char}</w>" for char in chars), *_SPECIAL_TOKENS]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        # The header line alone: no merges, so every character stays its own token.
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        # Without an explicit length the tokenizer's is "unbounded" (~1e30) and the pipeline's
        # padding to it fails with OverflowError.
        tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
            folder, model_max_length=PROMPT_TOKENS
        )
    return tokenizer


def _scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule."""
    scheduler: DDIMScheduler = DDIMScheduler(
        prediction_type=prediction_type,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return scheduler


def _save_random_pipeline(
    path: Path,
    make_models: Callable[[CLIPTokenizer], Models],
    dtype: torch.dtype = torch.float32,
    scheduler: DDIMScheduler | None = None,
) -> None:
    """Build `make_models`' components from seed 0 and save them as a Stable Diffusion pipeline."""
    tokenizer = _char_tokenizer()
    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, vae, text_encoder = make_models(tokenizer)
    # Passed untyped: diffusers annotates `scheduler` as an enum and the safety checker and feature
    # extractor as required, while the constructor takes any scheduler and None for both.
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler or _scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
    }
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    if dtype != torch.float32:
        # Models are built in fp32; casting warns (about an empty list of modules), so cast only
        # when the weights are to be stored smaller.
        pipe.to(dtype=dtype)
    pipe.save_pretrained(path)


def build_tiny_xl(path: Path) -> None:
    """Write a tiny SDXL-shaped pipeline (two text encoders, size conditioning) to `path`."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    tokenizer = _char_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        projection_dim=32,
    )
    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, vae = _tiny_xl_unet(), _tiny_xl_vae()
        text_encoder, text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        # SDXL's own schedule: Euler over "leading" timesteps.
        scheduler=EulerDiscreteScheduler.from_config(
            _scheduler().config, timestep_spacing="leading"
        ),
        add_watermarker=False,
    )
    pipe.save_pretrained(path)


def _tiny_xl_unet() -> UNet2DConditionModel:
    """SDXL's UNet at toy scale: it reads both encoders' hidden states side by side (32 + 32) and
    adds the second's pooled projection (32) to six size and crop ids of 8 features each."""
    unet: UNet2DConditionModel = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    return unet


def _tiny_xl_vae() -> AutoencoderKL:
    """The tiny model's VAE shape: 4 latent channels, each side halved once."""
    vae: AutoencoderKL = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    )
    return vae


# The models a tiny LoRA can be made for.
_LORA_BASES: dict[str, Callable[[CLIPTokenizer], Models]] = {
    "tiny": _tiny_models,
    "tiny-sd2": _tiny_sd2_models,
}

_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny": build_tiny,
    "tiny-xl": build_tiny_xl,
    "sd15-random": build_sd15_random,
    "tiny-sd2": build_tiny_sd2,
}


def load_pipeline(
    model: str, cache_dir: Path, device: str | None = None, dtype: str | None = None
) -> DiffusionPipeline:
    """Load `model` (`tiny`, `sd15-random`, a diffusers model id or a local path) onto `device`."""
    target = resolve_device(device)
    pipe = _from_pretrained(model, cache_dir, resolve_dtype(target, dtype))
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipe.to(target)


def _from_pretrained(model: str, cache_dir: Path, dtype: torch.dtype) -> DiffusionPipeline:
    """Load `model`'s weights in `dtype`, building a random-weight one into `cache_dir` if named."""
    build = _BUILDERS.get(model)
    if build is None:
        # Typed here because diffusers leaves this classmethod unannotated.
        load: Callable[..., DiffusionPipeline] = AutoPipelineForText2Image.from_pretrained
        with _SEEDED:
            return load(model, torch_dtype=dtype, **_without_safety_checker(model))
    # The pipeline class is the one the build saved (SD or SDXL), as for any local path.
    path = str(_ensure_built(cache_dir / model, build))
    with _SEEDED:
        return DiffusionPipeline.from_pretrained(
            path, torch_dtype=dtype, **_without_safety_checker(path)
        )


def _without_safety_checker(model: str) -> dict[str, Any]:
    """Keyword arguments that turn off `model`'s safety checker, if its pipeline has one."""
    # Pipelines without one (SDXL, SD3, ...) warn about the keywords, so only pass them when wanted.
    # Annotated as a tuple, but without `return_unused_kwargs` load_config returns the dict alone.
    config = cast(dict[str, Any], DiffusionPipeline.load_config(model))
    if "safety_checker" not in config:
        return {}
    return {"safety_checker": None, "requires_safety_checker": False}


def _ensure_built(path: Path, build: Callable[[Path], None]) -> Path:
    """Build a pipeline at `path` unless one is there; processes racing to build it are safe."""
    if (path / "model_index.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, on the same filesystem, so that publishing it is one rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    # mkdtemp makes it private to us; the published model is read by every worker's user.
    staging.chmod(0o755)
    try:
        log.info("building the %s pipeline in %s", path.name, path)
        build(staging)
        _publish(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _publish(staging: Path, path: Path) -> None:
    """Move a finished build into place atomically, unless another builder got there first."""
    try:
        staging.rename(path)
    except OSError as error:
        # The rename fails when `path` already holds files: another builder won the race, and its
        # pipeline is the same seeded one as ours.
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"{path} exists but holds no pipeline: remove it and the model will be rebuilt"
            ) from error


def model_limits(pipe: DiffusionPipeline) -> tuple[int, int]:
    """The smallest and largest image side, in pixels, that `pipe` accepts (multiples of 8)."""
    # Each UNet down block halves the latent again; the image must leave at least one latent pixel
    # at the bottom. Transformer-based pipelines have no UNet and no such floor beyond MIN_SIDE.
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return MIN_SIDE, MAX_SIDE
    granule = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    return max(MIN_SIDE, granule), MAX_SIDE
