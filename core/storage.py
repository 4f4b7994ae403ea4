"""Object storage for images: S3 (or any S3-compatible store) and a local folder."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from core.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FILES_ROUTE = "/v1/files/"
UPLOADS_ROUTE = "/v1/uploads/"


class NotStored(StorageError):
    """No object at the key asked for."""

    code = "not_stored"


class ObjectStore(Protocol):
    """Where images go, and how a client gets them back."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write an object at `key`, overwriting any earlier copy."""

    def url(self, key: str, ttl_s: int) -> str:
        """A URL that reads `key` for `ttl_s` seconds (absolute, or relative to the gateway)."""

    def check(self) -> None:
        """Raise StorageError unless the store is reachable."""

    def delete_folder(self, folder: str) -> int:
        """Delete every object under `folder` (a job's images and inputs); how many."""


def job_folder(prefix: str, job_id: str) -> str:
    """The folder of a job's objects: everything of it is deleted together."""
    return "/".join(p for p in (prefix.strip("/"), job_id) if p) + "/"


def image_key(prefix: str, job_id: str, index: int, ext: str) -> str:
    """The deterministic key of a job's `index`-th image: a re-run overwrites, never doubles."""
    return "/".join(p for p in (prefix.strip("/"), job_id, f"{index}.{ext}") if p)


def input_key(prefix: str, job_id: str, name: str) -> str:
    """Where a job's input (`image`, `mask`) is kept: beside its outputs, expiring with them."""
    return "/".join(p for p in (prefix.strip("/"), job_id, f"input-{name}.png") if p)


def upload_key(prefix: str, upload_id: str) -> str:
    """Where a client's upload lands before a job names it (`upload:<id>`)."""
    return "/".join(p for p in (prefix.strip("/"), "uploads", upload_id) if p)


def new_upload_id() -> str:
    """An upload id with 128 random bits: knowing it is the right to use the upload."""
    return "up_" + secrets.token_hex(16)


def _too_large(key: str, max_bytes: int) -> StorageError:
    return StorageError(f"{key} is larger than {max_bytes} bytes", code="too_large")


class S3Store:
    """Images in an S3 bucket, read through presigned URLs."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client = client

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload one object."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def url(self, key: str, ttl_s: int) -> str:
        """A presigned GET URL."""
        return str(
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_s
            )
        )

    def upload_url(self, key: str, ttl_s: int, content_type: str) -> str:
        """A presigned PUT URL: the client uploads straight to the bucket, never through us."""
        params = {"Bucket": self.bucket, "Key": key, "ContentType": content_type}
        return str(self.client.generate_presigned_url("put_object", Params=params, ExpiresIn=ttl_s))

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Read an object back, refusing one past `max_bytes` before reading its body."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.NoSuchKey as e:
            raise NotStored(f"no object at {key}") from e
        body = answer["Body"]
        try:
            if max_bytes is not None and int(answer.get("ContentLength", 0)) > max_bytes:
                raise _too_large(key, max_bytes)
            data: bytes = body.read() if max_bytes is None else body.read(max_bytes + 1)
        finally:
            body.close()
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(key, max_bytes)
        return data

    def check(self) -> None:
        """HEAD the bucket."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise StorageError(f"bucket {self.bucket} is not reachable: {e}") from e

    def delete_folder(self, folder: str) -> int:
        """Delete the objects under `folder`, a page (up to 1,000) per request."""
        deleted = 0
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=folder):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})
                deleted += len(objects)
        return deleted


class FileStore:
    """Images in a local folder, served by the gateway behind signed, expiring URLs."""

    def __init__(self, root: Path, secret: bytes) -> None:
        self.root = root
        self.prefix = ""
        self.secret = secret

    def path(self, key: str) -> Path:
        """The file behind `key`; refuses keys that climb out of the root."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"key {key!r} leaves the storage folder")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write atomically: a reader never sees half an image."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def url(self, key: str, ttl_s: int) -> str:
        """A gateway path with an expiry and an HMAC over both."""
        expires = int(time.time()) + ttl_s
        return f"{FILES_ROUTE}{quote(key)}?expires={expires}&sig={self.signature(key, expires)}"

    def signature(self, key: str, expires: int) -> str:
        """HMAC-SHA256 of key and expiry."""
        return hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, sig: str) -> bool:
        """True when `sig` signs `key` (as the route received it, decoded once) and is unexpired."""
        # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a no).
        expected = self.signature(key, expires).encode()
        good = hmac.compare_digest(expected, sig.encode(errors="replace"))
        return good and expires >= time.time()

    def delete_folder(self, folder: str) -> int:
        """Delete the files under `folder` and the folder itself."""
        path = self.path(folder.rstrip("/"))
        if path == self.root.resolve() or not path.is_dir():
            return 0
        files = [p for p in path.rglob("*") if p.is_file()]
        shutil.rmtree(path, ignore_errors=True)
        return len(files)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Read an object back, refusing one past `max_bytes` (reading one byte more at most)."""
        path = self.path(key)
        try:
            with path.open("rb") as file:
                data = file.read(-1 if max_bytes is None else max_bytes + 1)
        except FileNotFoundError as e:
            raise NotStored(f"no object at {key}") from e
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(key, max_bytes)
        return data

    def upload_url(self, key: str, ttl_s: int, content_type: str) -> str:
        """A gateway path a client may PUT `key` to until it expires (signed apart from reads)."""
        # content_type is not signed: the type of what arrives is read from its bytes anyway.
        expires = int(time.time()) + ttl_s
        sig = self._upload_signature(key, expires)
        return f"{UPLOADS_ROUTE}{quote(key)}?expires={expires}&sig={sig}"

    def verify_upload(self, key: str, expires: int, sig: str) -> bool:
        """True when an upload URL's signature matches and has not expired."""
        expected = self._upload_signature(key, expires).encode()
        good = hmac.compare_digest(expected, sig.encode("utf-8", "replace"))
        return good and expires >= time.time()

    def _upload_signature(self, key: str, expires: int) -> str:
        # "PUT" in the message: a signed read URL can never be replayed as a write.
        message = f"PUT\n{key}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def check(self) -> None:
        """The folder exists or can be made."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot use {self.root}: {e}") from e


def open_store(
    url: str, *, secret: bytes, endpoint_url: str | None = None, region: str | None = None
) -> S3Store | FileStore:
    """The store a storage URL names."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return FileStore(Path(unquote(parts.path)), secret)
    if parts.scheme == "s3":
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5)
        client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        return S3Store(parts.netloc, parts.path.strip("/"), client)
    raise ConfigError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or file:///dir")


def put_with_retries(
    store: ObjectStore, key: str, data: bytes, content_type: str, attempts: int = 4
) -> None:
    """Write with bounded retries and backoff, then give up with a StorageError."""
    for attempt in range(1, attempts + 1):
        try:
            store.put(key, data, content_type)
            return
        except StorageError:
            raise
        except Exception as e:
            if attempt == attempts:
                raise StorageError(f"could not store {key} after {attempts} tries: {e}") from e
            log.warning("storing %s failed (try %d of %d): %s", key, attempt, attempts, e)
            time.sleep(0.2 * 2**attempt)
