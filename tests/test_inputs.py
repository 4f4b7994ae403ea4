"""Image inputs against real HTTP(S) servers on 127.0.0.1, real storage, and hostile files."""

from __future__ import annotations

import base64
import contextlib
import io
import resource
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image

from core.storage import FileStore, S3Store, input_key, new_upload_id, upload_key
from tests.test_callbacks import _tls_pair
from worker.inputs import (
    InputLimits,
    InputLoader,
    InputRefused,
    decode,
    fit,
    png_bytes,
    prepare_inputs,
    read_data_uri,
    sniff,
)

MB = 1024 * 1024
LIMITS = InputLimits(max_bytes=2 * MB, max_pixels=4096 * 4096, timeout_s=3.0)
# Loopback servers stand in for the internet here, so fetches that should succeed allow them.
LOOPBACK = InputLimits(LIMITS.max_bytes, LIMITS.max_pixels, LIMITS.timeout_s, allow_private=True)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    """An image file's bytes."""
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def picture(width: int = 80, height: int = 64) -> Image.Image:
    """A random RGB picture."""
    rng = np.random.default_rng(width * height)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def data_uri(data: bytes, media: str = "image/png") -> str:
    """A base64 data: URI."""
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def png_bomb(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024, 9)  # the start of the first rows; nothing more is sent
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


# --- servers ------------------------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class Server(ThreadingHTTPServer):
    """A loopback HTTP server that counts the connections it accepts and the bytes it sent."""

    daemon_threads = True

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.connections = 0
        self.sent = 0
        handler = type("Handler", (_Handler,), {})
        super().__init__(("127.0.0.1", 0), handler)

    def get_request(self) -> tuple[socket.socket, object]:
        """Accept one connection, counting it."""
        accepted = super().get_request()
        self.connections += 1
        return accepted

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        # An OSError is the client hanging up, as it should on a body past its cap.
        with contextlib.suppress(OSError):
            route(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


def answer(body: bytes, content_type: str = "image/png", status: int = 200) -> Route:
    """A route answering with one body."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def redirect(location: str) -> Route:
    """A route answering 302 to location."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def flood(total: int, announce: bool) -> Route:
    """A route sending `total` bytes of a PNG-looking body, with or without a Content-Length."""

    def route(h: BaseHTTPRequestHandler) -> None:
        server: Server = h.server  # type: ignore[assignment]
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        if announce:
            h.send_header("Content-Length", str(total))
        else:
            h.send_header("Connection", "close")
        h.end_headers()
        block = b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024 - 8)
        while server.sent < total:
            h.wfile.write(block)
            server.sent += len(block)

    return route


def trickle(h: BaseHTTPRequestHandler) -> None:
    """A route sending a byte every 0.1 s, forever."""
    h.send_response(200)
    h.send_header("Content-Length", str(MB))
    h.end_headers()
    for _ in range(600):
        h.wfile.write(b"\x89")
        h.wfile.flush()
        time.sleep(0.1)


Serve = Callable[..., Server]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start loopback servers with routes; all stopped at the end."""
    servers: list[Server] = []

    def start(routes: dict[str, Route], tls: ssl.SSLContext | None = None) -> Server:
        server = Server(routes)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def canary(serve: Serve) -> Server:
    """A server that must never be reached: it serves a perfectly good image."""
    return serve({"/": answer(encoded(picture()))})


def refused(loader: InputLoader, ref: str, field: str = "image") -> InputRefused:
    """The refusal that loading `ref` ends in."""
    with pytest.raises(InputRefused) as raised:
        loader.load(ref, field)
    assert (raised.value.field, raised.value.status) == (field, 422)
    return raised.value


# --- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "https://127.0.0.1:{port}/",
            "image URL refused: host resolves to 127.0.0.1, a loopback address; only public"
            " addresses are allowed",
        ),
        ("https://localhost:{port}/", "image URL refused: host resolves to "),
        ("https://[::ffff:127.0.0.1]:{port}/", "(which carries 127.0.0.1), a loopback address"),
        ("https://2130706433:{port}/", "is a non-standard spelling of the IPv4 address 127.0.0.1"),
        ("http://127.0.0.1:{port}/", "image URL must be https"),
        ("https://user@127.0.0.1:{port}/", "image URL refused: URL must not contain a user name"),
    ],
)
def test_a_url_on_a_private_address_is_refused_without_a_connection(
    canary: Server, url: str, message: str
) -> None:
    error = refused(InputLoader(LIMITS), url.format(port=canary.port))

    assert error.code == "input_unsafe_url"
    assert error.message.startswith(message) or message in error.message
    assert canary.connections == 0


def test_a_redirect_is_not_followed(serve: Serve, canary: Server) -> None:
    # Even with loopback allowed (so the first server is reachable at all), the redirect is an
    # answer, not a hop: the canary it points at is never contacted.
    first = serve({"/img.png": redirect(f"http://127.0.0.1:{canary.port}/")})

    error = refused(InputLoader(LOOPBACK), f"http://127.0.0.1:{first.port}/img.png")

    assert (error.code, error.message) == (
        "input_redirect",
        "image URL answered with a redirect (302): give the image's final URL",
    )
    assert (first.connections, canary.connections) == (1, 0)


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "no-length"])
def test_a_50_mb_body_is_refused_without_reading_it(serve: Serve, announce: bool) -> None:
    server = serve({"/big.png": flood(50 * MB, announce)})
    started = time.monotonic()

    error = refused(InputLoader(LOOPBACK), f"http://127.0.0.1:{server.port}/big.png")

    assert (error.code, error.message) == ("input_too_large", "image is larger than 2097152 bytes")
    assert time.monotonic() - started < 2.0
    # The server gave up well short of its 50 MB once the worker hung up (socket buffers aside).
    deadline = time.monotonic() + 5
    while server.sent < 50 * MB and time.monotonic() < deadline:
        before = server.sent
        time.sleep(0.2)
        if server.sent == before:
            break
    assert server.sent < 20 * MB


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"<html>not an image</html>", "input_not_image", "image is not a PNG, JPEG or WebP image"),
        (
            b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,
            "input_not_image",
            "image is not a readable PNG image",
        ),
        (
            encoded(picture())[:300],
            "input_not_image",
            "image is a damaged PNG image",
        ),
    ],
    ids=["html", "png-signature-only", "truncated-png"],
)
def test_a_non_image_is_refused(serve: Serve, body: bytes, code: str, message: str) -> None:
    server = serve({"/x": answer(body, content_type="image/png")})

    error = refused(InputLoader(LOOPBACK), f"http://127.0.0.1:{server.port}/x")

    assert (error.code, error.message) == (code, message)


@pytest.mark.parametrize(
    ("status", "message"),
    [(404, "image URL answered 404, not 200"), (500, "image URL answered 500, not 200")],
)
def test_an_error_answer_is_refused(serve: Serve, status: int, message: str) -> None:
    server = serve({"/x": answer(b"no", status=status)})

    error = refused(InputLoader(LOOPBACK), f"http://127.0.0.1:{server.port}/x")

    assert (error.code, error.message) == ("input_fetch_failed", message)


def test_a_server_that_trickles_is_cut_off_at_the_timeout(serve: Serve) -> None:
    server = serve({"/slow.png": trickle})
    limits = InputLimits(LIMITS.max_bytes, LIMITS.max_pixels, timeout_s=1.0, allow_private=True)
    started = time.monotonic()

    error = refused(InputLoader(limits), f"http://127.0.0.1:{server.port}/slow.png")

    assert (error.code, error.message) == ("input_fetch_failed", "image URL fetch timed out")
    assert 0.9 < time.monotonic() - started < 1.8


def test_an_unresolvable_host_is_a_fetch_failure() -> None:
    error = refused(InputLoader(LIMITS), "https://no-such-host.invalid/x.png")

    assert (error.code, error.message) == (
        "input_fetch_failed",
        "image URL host could not be resolved",
    )


def test_a_good_image_url_is_fetched_over_https_from_the_checked_address(
    serve: Serve, tmp_path: Path
) -> None:
    server_tls, client_tls, sni = _tls_pair("images.example", tmp_path)
    original = picture()
    server = serve({"/cat.jpg": answer(encoded(original, "JPEG"), "image/jpeg")}, tls=server_tls)
    # The name resolves to loopback only in this test; the connection goes to that address.
    loader = InputLoader(LOOPBACK, resolve=lambda host, port: ["127.0.0.1"], ssl_context=client_tls)

    image = loader.load(f"https://images.example:{server.port}/cat.jpg", "image")

    assert (image.mode, image.size) == ("RGB", original.size)
    assert sni == ["images.example"]


# --- data: URIs and files -----------------------------------------------------------------------


def test_a_data_uri_over_the_limit_is_refused_before_decoding() -> None:
    small = InputLimits(max_bytes=1000)
    uri = data_uri(bytes(5000))

    error = refused(InputLoader(small), uri)

    assert (error.code, error.message) == ("input_too_large", "image is larger than 1000 bytes")
    # Refused by its length alone: an undecodable payload of that length is refused the same way.
    assert refused(InputLoader(small), "data:image/png;base64," + "!" * 5000).code == (
        "input_too_large"
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png,%89PNG", "image data: URI must be base64 (data:image/png;base64,...)"),
        ("data:image/png;base64,@@@@", "image data: URI is not valid base64"),
        ("ftp://example.com/x.png", "image must be an https URL, a data: URI or upload:<id>"),
    ],
)
def test_a_malformed_reference_is_refused(uri: str, message: str) -> None:
    error = refused(InputLoader(LIMITS), uri)

    assert (error.code, error.message) == ("input_ref", message)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((30000, 30000), "image has more than 16777216 pixels: send a smaller image"),
        ((5000, 4000), "image has more than 16777216 pixels (5000x4000): send a smaller image"),
    ],
)
def test_a_decompression_bomb_is_refused_before_decoding_a_pixel(
    size: tuple[int, int], message: str
) -> None:
    bomb = png_bomb(*size)
    assert len(bomb) < 100
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()

    error = refused(InputLoader(LIMITS), data_uri(bomb))

    assert (error.code, error.message) == ("input_too_many_pixels", message)
    # Decoding would take 2.7 GB (or 60 MB) and seconds; refusing takes neither.
    assert time.monotonic() - started < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50_000  # KiB


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("WEBP", "RGB")],
)
def test_good_files_decode_to_rgb_images_and_masks_to_grayscale(fmt: str, mode: str) -> None:
    original = picture().convert(mode)
    loader = InputLoader(LIMITS)

    image = loader.load(data_uri(encoded(original, fmt)), "image")
    mask = loader.load(data_uri(encoded(original, fmt)), "mask")

    assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (80, 64), "L", (80, 64))
    if fmt == "PNG" and mode == "RGB":
        assert np.array_equal(np.asarray(image), np.asarray(original))


def test_a_claimed_type_is_ignored_for_the_sniffed_one() -> None:
    jpeg = encoded(picture(), "JPEG")

    assert read_data_uri(data_uri(jpeg, "text/html"), "image", MB) == jpeg
    assert sniff(jpeg) == "JPEG"
    assert decode(jpeg, "image", 80 * 64).size == (80, 64)


def test_the_worker_is_unharmed_by_a_run_of_bad_inputs(serve: Serve, canary: Server) -> None:
    server = serve({"/big": flood(50 * MB, False), "/text": answer(b"hello", "text/plain")})
    loader = InputLoader(LOOPBACK)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad = [
        data_uri(png_bomb(30000, 30000)),
        f"http://127.0.0.1:{server.port}/big",
        f"http://127.0.0.1:{server.port}/text",
        data_uri(b"\x89PNG\r\n\x1a\nrubbish"),
    ]

    codes = [refused(loader, ref).code for ref in bad for _ in range(3)]

    assert codes == [
        *["input_too_many_pixels"] * 3,
        *["input_too_large"] * 3,
        *["input_not_image"] * 6,
    ]
    assert loader.load(f"http://127.0.0.1:{canary.port}/", "image").size == (80, 64)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB


# --- uploads ------------------------------------------------------------------------------------


def test_an_upload_is_read_back_from_a_local_store(tmp_path: Path) -> None:
    store = FileStore(tmp_path, b"secret")
    upload_id = new_upload_id()
    store.put(upload_key("", upload_id), encoded(picture()), "image/png")
    loader = InputLoader(InputLimits(max_bytes=MB), store)

    assert loader.load(f"upload:{upload_id}", "image").size == (80, 64)
    assert refused(loader, "upload:up_missing").code == "input_not_found"
    assert refused(loader, "upload:../../etc/passwd").code == "input_not_found"
    store.put(upload_key("", "up_big"), bytes(MB + 1), "image/png")
    assert refused(loader, "upload:up_big").code == "input_too_large"


def test_a_local_upload_url_is_signed_for_writing_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path, b"secret")
    url = store.upload_url("uploads/up_1", 60, "image/png")
    path, _, query = url.partition("?")
    params = dict(part.split("=") for part in query.split("&"))
    expires, sig = int(params["expires"]), params["sig"]

    assert path == "/v1/uploads/uploads/up_1"
    assert store.verify_upload("uploads/up_1", expires, sig)
    assert not store.verify_upload("uploads/up_2", expires, sig)
    assert not store.verify(path.removeprefix("/v1/uploads/"), expires, sig)  # not a read URL
    assert not store.verify_upload("uploads/up_1", int(time.time()) - 1, sig)


def test_an_upload_to_a_presigned_s3_url_is_read_back(s3_endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="inputs")
    store = S3Store("inputs", "dq", client)
    upload_id = new_upload_id()
    data = encoded(picture())

    url = store.upload_url(upload_key("dq", upload_id), 60, "image/png")
    put = httpx.put(url, content=data, headers={"Content-Type": "image/png"})

    assert put.status_code == 200
    loader = InputLoader(InputLimits(max_bytes=MB), store, "dq")
    assert loader.load(f"upload:{upload_id}", "image").size == (80, 64)
    assert refused(loader, "upload:up_never").code == "input_not_found"
    small = InputLoader(InputLimits(max_bytes=1024), store, "dq")
    assert refused(small, f"upload:{upload_id}").code == "input_too_large"


# --- fitting and storing ------------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["cover", "contain", "stretch"])
def test_an_input_is_fitted_to_the_size_asked(resize: str) -> None:
    fitted = fit(picture(96, 64), 64, 64, resize, "image")  # type: ignore[arg-type]

    assert fitted.size == (64, 64)


def test_a_model_may_refuse_inputs_of_another_size() -> None:
    with pytest.raises(InputRefused) as raised:
        fit(picture(96, 64), 64, 64, "refuse", "image")

    assert (raised.value.code, raised.value.message) == (
        "input_size",
        "image is 96x64; this model takes 64x64 exactly",
    )
    assert fit(picture(64, 64), 64, 64, "refuse", "image").size == (64, 64)


def test_inputs_are_stored_beside_the_jobs_outputs(tmp_path: Path) -> None:
    store = FileStore(tmp_path, b"secret")
    mask = Image.new("L", (160, 128), 0)
    refs = (data_uri(encoded(picture(160, 128))), data_uri(encoded(mask)))

    inputs = prepare_inputs(InputLoader(LIMITS), store, "job_1", refs, (64, 64), "cover")

    assert inputs.image is not None
    assert inputs.mask is not None
    assert (inputs.image.size, inputs.mask.size, inputs.mask.mode) == ((64, 64), (64, 64), "L")
    assert sorted(p.name for p in (tmp_path / "job_1").iterdir()) == [
        "input-image.png",
        "input-mask.png",
    ]
    stored = Image.open(store.path(input_key("", "job_1", "image")))
    assert np.array_equal(np.asarray(stored), np.asarray(inputs.image))
    assert png_bytes(inputs.image) == store.get("job_1/input-image.png")


def test_a_mask_of_another_shape_is_refused(tmp_path: Path) -> None:
    refs = (data_uri(encoded(picture(80, 64))), data_uri(encoded(Image.new("L", (64, 64)))))

    with pytest.raises(InputRefused) as raised:
        prepare_inputs(InputLoader(LIMITS), FileStore(tmp_path, b""), "j", refs, (64, 64), "cover")

    assert (raised.value.field, raised.value.code) == ("mask", "input_size")
    assert raised.value.message == (
        "mask is 64x64 and image 80x64: give a mask of the image's shape"
    )


def test_a_text_job_has_no_inputs(tmp_path: Path) -> None:
    store = FileStore(tmp_path, b"")

    inputs = prepare_inputs(InputLoader(LIMITS), store, "j", (None, None), (64, 64), "cover")

    assert (inputs.image, inputs.mask) == (None, None)
    assert list(tmp_path.iterdir()) == []
