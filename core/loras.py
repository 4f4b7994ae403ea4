"""The LoRA catalog: a folder of safetensors files, each read by its header alone (no torch).

A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON: the
name, dtype, shape and byte range of every tensor, and a `__metadata__` map of strings. That is
all the gateway needs to know which LoRAs exist and which model family each one is for.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

# The families whose pipelines take LoRAs through diffusers' adapter API.
ADAPTER_FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_KEY = "dq.family"
SUFFIX = ".safetensors"
# The format caps its header at 100 MB; real LoRA headers are tens of kilobytes.
MAX_HEADER_BYTES = 16 * 1024 * 1024
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# The width of the text embedding the UNet's cross-attention reads, by family.
_CROSS_ATTENTION_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_DOWN_WEIGHTS = ("lora_A.weight", "lora.down.weight", "lora_down.weight")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA a request may name: its file, its family and the bytes its tensors take."""

    name: str
    path: Path
    family: str
    size_bytes: int


class LoraCatalog:
    """The LoRAs of a deployment, by name."""

    def __init__(self, files: Iterable[LoraFile] = ()) -> None:
        self.files = {f.name: f for f in sorted(files, key=lambda f: f.name)}

    @classmethod
    def scan(cls, folder: Path | None, families: Mapping[str, str] | None = None) -> LoraCatalog:
        """Every `*.safetensors` file in `folder` (none when unset); `families` overrides."""
        if folder is None:
            return cls()
        if not folder.is_dir():
            raise ConfigError(
                f"LoRA folder {folder} does not exist: create it or fix DQ_LORAS / lora_folder"
            )
        overrides = dict(families or {})
        found = [_read(path, overrides.pop(path.stem, None)) for path in _files(folder)]
        if overrides:
            raise ConfigError(
                f"lora_families names {', '.join(sorted(overrides))}, which are not files in"
                f" {folder}: remove the entries or add the files (name.safetensors)"
            )
        return cls(found)

    def get(self, name: str) -> LoraFile | None:
        """The LoRA called `name`, if there is one."""
        return self.files.get(name)

    def for_family(self, family: str) -> list[str]:
        """Names of the LoRAs made for `family`."""
        return [name for name, f in self.files.items() if f.family == family]


def _files(folder: Path) -> list[Path]:
    """The LoRA files of a folder, refusing names a request could not spell."""
    paths = sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and p.is_file())
    bad = [p.name for p in paths if not NAME.fullmatch(p.stem)]
    if bad:
        raise ConfigError(
            f"LoRA file names {bad} in {folder} are not usable names: rename them to letters,"
            " digits, '.', '_' and '-' (from a letter or digit), e.g. pixel-art.safetensors"
        )
    return paths


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, or a ConfigError saying what is wrong with it."""
    try:
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ConfigError(f"{path} is not a safetensors file (it is too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ConfigError(f"{path} is not a safetensors file (its header is too long)")
            raw = file.read(length)
    except OSError as e:
        raise ConfigError(f"cannot read LoRA file {path}: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a safetensors file (its header is not JSON)") from e
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return header


def _read(path: Path, family: str | None) -> LoraFile:
    """What the catalog needs of one LoRA file."""
    header = read_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    metadata = header.get("__metadata__") or {}
    family = family or family_of(metadata, tensors)
    if family is None:
        raise ConfigError(
            f"cannot tell which model family LoRA file {path} is for: add it to the catalog file"
            f' as [lora_families] "{path.stem}" = "sd1" (or sd2, sdxl)'
        )
    if family not in ADAPTER_FAMILIES:
        raise ConfigError(
            f"LoRA file {path} says it is for family {family!r}: LoRAs are for sd1, sd2 or sdxl"
        )
    size = sum(
        end - start for start, end in (t.get("data_offsets", (0, 0)) for t in tensors.values())
    )
    return LoraFile(path.stem, path.resolve(), family, size)


def family_of(metadata: Mapping[str, str], tensors: Mapping[str, Any]) -> str | None:
    """The family a LoRA names in its metadata, or the one its tensors' shapes give away."""
    if metadata.get(FAMILY_KEY):
        return metadata[FAMILY_KEY]
    # kohya's trainer and the Stability model spec, the two conventions in the wild.
    kohya = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    if kohya.startswith("sdxl") or "-xl-" in spec:
        return "sdxl"
    if kohya.startswith("sd_v2") or spec.startswith("stable-diffusion-v2"):
        return "sd2"
    if kohya.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return "sd1"
    return _family_by_shape(tensors)


def _family_by_shape(tensors: Mapping[str, Any]) -> str | None:
    """The family whose text embedding is as wide as the LoRA's cross-attention key input."""
    if any("text_encoder_2" in key or "lora_te2_" in key for key in tensors):
        return "sdxl"
    for key, info in tensors.items():
        if "attn2" in key and "to_k" in key and key.endswith(_DOWN_WEIGHTS):
            shape = info.get("shape") or []
            if len(shape) == 2:
                return _CROSS_ATTENTION_FAMILY.get(int(shape[1]))
    return None
