"""Image inputs (img2img, inpaint): fetched, sniffed, capped and decoded, and never trusted.

A request gives an input as an `https` URL, a `data:` URI or `upload:<id>` (a file the client put
at a presigned URL first). Every byte count is capped before it is read, the content type comes
from the bytes themselves, and an image's pixel count is checked from its header before a single
pixel is decoded, so a decompression bomb costs a few hundred bytes of reading. Each refusal is an
InputRefused with a public message and a code, and leaves the worker as it was.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import ssl
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import httpcore
from PIL import Image, ImageOps, UnidentifiedImageError

from core.catalog import Resize
from core.errors import StorageError, ValidationFailed
from core.outbound import TRANSPORT_ERRORS, pinned_request
from core.settings import Settings
from core.storage import NotStored, ObjectStore, input_key, put_with_retries, upload_key
from core.urlguard import HostNotFound, Resolver, UnsafeUrl, check_url, resolve_host

# The formats we decode; PIL knows dozens more (some through external programs), none wanted.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
# A mask's shape may differ from its image's by rounding, not by more.
_ASPECT_TOLERANCE = 0.02


class InputRefused(ValidationFailed):
    """An image input we will not use; the message is safe to show the client."""

    def __init__(self, message: str, *, field: str, code: str) -> None:
        super().__init__(message, field=field, code=code)


@dataclass(frozen=True)
class InputLimits:
    """How much of an input a worker reads, decodes and waits for."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    timeout_s: float = 15.0
    allow_private: bool = False  # local development only: URLs on private addresses

    @classmethod
    def of(cls, settings: Settings) -> InputLimits:
        """The limits the settings give."""
        return cls(
            settings.input_max_bytes,
            settings.input_max_pixels,
            settings.input_timeout_s,
            settings.input_allow_private,
        )


class ReadableStore(Protocol):
    """Storage an upload can be read back from."""

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object at `key`."""


@dataclass(frozen=True)
class Inputs:
    """A job's inputs, decoded and fitted to its size."""

    image: Image.Image | None = None
    mask: Image.Image | None = None


class InputLoader:
    """Reads a request's image inputs from wherever they are, within the limits."""

    def __init__(
        self,
        limits: InputLimits,
        store: ReadableStore | None = None,
        prefix: str = "",
        *,
        resolve: Resolver = resolve_host,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limits = limits
        self.store = store
        self.prefix = prefix
        self.resolve = resolve
        self.ssl_context = ssl_context

    def load(self, ref: str, field: str) -> Image.Image:
        """The image `ref` names, decoded: RGB for an image, grayscale for a mask."""
        image = decode(self.read(ref, field), field, self.limits.max_pixels)
        return image.convert("L" if field == "mask" else "RGB")

    def read(self, ref: str, field: str) -> bytes:
        """The bytes `ref` names, at most `max_bytes` of them."""
        if ref.startswith("data:"):
            return read_data_uri(ref, field, self.limits.max_bytes)
        if ref.startswith("upload:"):
            return self._read_upload(ref.removeprefix("upload:"), field)
        if ref.startswith(("https://", "http://")):
            return self._fetch(ref, field)
        raise InputRefused(
            f"{field} must be an https URL, a data: URI or upload:<id>",
            field=field,
            code="input_ref",
        )

    def _read_upload(self, upload_id: str, field: str) -> bytes:
        """An upload, read back from storage."""
        if self.store is None or not _UPLOAD_ID.fullmatch(upload_id):
            raise InputRefused(f"{field}: no such upload", field=field, code="input_not_found")
        try:
            return self.store.get(upload_key(self.prefix, upload_id), self.limits.max_bytes)
        except NotStored as e:
            raise InputRefused(
                f"{field}: no such upload (uploads expire; upload it again)",
                field=field,
                code="input_not_found",
            ) from e
        except StorageError as e:
            if e.code == "too_large":
                raise _too_large(field, self.limits.max_bytes) from e
            raise

    def _fetch(self, url: str, field: str) -> bytes:
        """GET the URL from a checked public address, refusing redirects and big bodies."""
        if not url.startswith("https://") and not self.limits.allow_private:
            raise InputRefused(f"{field} URL must be https", field=field, code="input_unsafe_url")
        try:
            target = check_url(url, allow_private=self.limits.allow_private, resolve=self.resolve)
        except HostNotFound as e:
            raise InputRefused(
                f"{field} URL host could not be resolved", field=field, code="input_fetch_failed"
            ) from e
        except UnsafeUrl as e:
            # The guard speaks of callback URLs; the rest of its reason holds for ours.
            reason = e.reason.removeprefix("callback ")
            raise InputRefused(
                f"{field} URL refused: {reason}", field=field, code="input_unsafe_url"
            ) from e
        headers = {"accept": "image/png, image/jpeg, image/webp", "user-agent": "diffusion-queue"}
        try:
            with pinned_request(
                target,
                "GET",
                headers,
                connect_timeout=min(5.0, self.limits.timeout_s),
                total_timeout=self.limits.timeout_s,
                ssl_context=self.ssl_context,
            ) as response:
                _check_answer(response.status, response.headers, field, self.limits.max_bytes)
                return _read_capped(response.iter_stream(), field, self.limits.max_bytes)
        except TRANSPORT_ERRORS as e:
            what = "timed out" if isinstance(e, httpcore.TimeoutException) else "failed"
            raise InputRefused(
                f"{field} URL fetch {what}", field=field, code="input_fetch_failed"
            ) from e


def _check_answer(
    status: int, headers: list[tuple[bytes, bytes]], field: str, max_bytes: int
) -> None:
    """Refuse anything but a 200 whose announced length is within the cap."""
    if 300 <= status < 400:
        # Not followed: a redirect could point anywhere, private addresses included.
        raise InputRefused(
            f"{field} URL answered with a redirect ({status}): give the image's final URL",
            field=field,
            code="input_redirect",
        )
    if status != 200:
        raise InputRefused(
            f"{field} URL answered {status}, not 200", field=field, code="input_fetch_failed"
        )
    for name, value in headers:
        length = value.strip()
        if name.lower() == b"content-length" and length.isdigit() and int(length) > max_bytes:
            raise _too_large(field, max_bytes)


def _read_capped(chunks: Iterable[bytes], field: str, max_bytes: int) -> bytes:
    """The body, refused as soon as it passes the cap (whatever its header said)."""
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(field, max_bytes)
    return bytes(body)


def _too_large(field: str, max_bytes: int) -> InputRefused:
    return InputRefused(
        f"{field} is larger than {max_bytes} bytes", field=field, code="input_too_large"
    )


def read_data_uri(uri: str, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI, refused unread when the URI is too long to fit."""
    # Base64 takes 4 characters per 3 bytes; 200 more cover any media type and parameters.
    if len(uri) > (max_bytes + 2) // 3 * 4 + 200:
        raise _too_large(field, max_bytes)
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InputRefused(
            f"{field} data: URI must be base64 (data:image/png;base64,...)",
            field=field,
            code="input_ref",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputRefused(
            f"{field} data: URI is not valid base64", field=field, code="input_ref"
        ) from e
    if len(data) > max_bytes:
        raise _too_large(field, max_bytes)
    return data


def sniff(data: bytes) -> str | None:
    """The image format the bytes start with (PNG, JPEG, WEBP), whatever anyone claims."""
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode an image, refusing any that would exceed `max_pixels` before decoding a pixel."""
    kind = sniff(data)
    if kind is None:
        raise InputRefused(
            f"{field} is not a PNG, JPEG or WebP image", field=field, code="input_not_image"
        )
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, past its own (higher) limit; ours comes first below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])  # reads the header only
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(field, None, max_pixels) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputRefused(
            f"{field} is not a readable {kind} image", field=field, code="input_not_image"
        ) from e
    if image.width * image.height > max_pixels:
        raise _too_many_pixels(field, image.size, max_pixels)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputRefused(
            f"{field} is a damaged {kind} image", field=field, code="input_not_image"
        ) from e


def _too_many_pixels(field: str, size: tuple[int, int] | None, max_pixels: int) -> InputRefused:
    shown = f" ({size[0]}x{size[1]})" if size else ""
    return InputRefused(
        f"{field} has more than {max_pixels} pixels{shown}: send a smaller image",
        field=field,
        code="input_too_many_pixels",
    )


def fit(image: Image.Image, width: int, height: int, resize: Resize, field: str) -> Image.Image:
    """The image at exactly width x height, by the model's rule (or refused by it)."""
    if image.size == (width, height):
        return image
    if resize == "refuse":
        raise InputRefused(
            f"{field} is {image.width}x{image.height}; this model takes {width}x{height} exactly",
            field=field,
            code="input_size",
        )
    smooth = Image.Resampling.LANCZOS
    if resize == "stretch":
        return image.resize((width, height), smooth)
    if resize == "contain":
        return ImageOps.pad(image, (width, height), smooth)
    return ImageOps.fit(image, (width, height), smooth)


def prepare_inputs(
    loader: InputLoader,
    storage: ObjectStore,
    job_id: str,
    refs: tuple[str | None, str | None],
    size: tuple[int, int],
    resize: Resize,
) -> Inputs:
    """Load a job's (image, mask), fit them to its size and store them beside its outputs."""
    image_ref, mask_ref = refs
    if image_ref is None:
        return Inputs()
    image = loader.load(image_ref, "image")
    mask = loader.load(mask_ref, "mask") if mask_ref is not None else None
    if mask is not None and abs(mask.width / mask.height - image.width / image.height) > (
        _ASPECT_TOLERANCE * image.width / image.height
    ):
        raise InputRefused(
            f"mask is {mask.width}x{mask.height} and image {image.width}x{image.height}:"
            " give a mask of the image's shape",
            field="mask",
            code="input_size",
        )
    fitted = Inputs(
        fit(image, *size, resize, "image"),
        fit(mask, *size, resize, "mask") if mask is not None else None,
    )
    for name, part in (("image", fitted.image), ("mask", fitted.mask)):
        if part is not None:
            key = input_key(loader.prefix, job_id, name)
            put_with_retries(storage, key, png_bytes(part), "image/png")
    return fitted


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
