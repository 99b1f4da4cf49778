"""Storage on any fsspec URI: local paths, file://, s3://, gs://, az:// / abfs://.

Every bucket operation goes through `call()` which retries transient errors with exponential
backoff and jitter, and on the last failure raises `StorageError` naming the URI (never a
credential). Credentials come only from where each filesystem normally reads them.

Publishing is atomic for readers: `publish_dir` uploads every file, verifies sizes, and writes
`MANIFEST.json` (files, sizes, sha256) last. An artifact without a manifest is incomplete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from launcher.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
MANIFEST = "MANIFEST.json"

RETRY_ATTEMPTS = int(os.environ.get("DREAMFLEET_STORAGE_ATTEMPTS", "6"))
RETRY_BASE_S = float(os.environ.get("DREAMFLEET_STORAGE_BACKOFF_S", "0.5"))
S3_CONNECTIONS = 32  # launcher.inputs_check.PARALLEL reads at once share one client
S3_CONNECT_TIMEOUT_S = 10  # object stores answer in milliseconds; a black-holed endpoint should not take minutes
_TRANSIENT_MARKERS = ("503", "500", "502", "504", "SlowDown", "Throttl", "RequestTimeout", "InternalError",
                      "ServiceUnavailable", "reset by peer", "Connection reset", "timed out", "Server disconnected",
                      "ServerDisconnected", "ClientOSError", "Connection aborted", "RemoteDisconnected",
                      "EndpointConnectionError", "ConnectTimeout", "ReadTimeout")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")) if is_local(uri) else Path(uri)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


_SECRET_PARTS = re.compile(r"(?<=://)[^/@\s]*@|\?[^\s'\"]+")
EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}  # pyproject extras


def redact(text: str) -> str:
    """A URI, or a message holding URIs, without their user:password@ parts and query strings
    (a signed URL's signature is a credential) before it goes into a message."""
    return _SECRET_PARTS.sub(lambda m: "?..." if m.group(0).startswith("?") else "", text)


def _fs(uri: str):
    import fsspec

    if is_local(uri):
        return fsspec.filesystem("file"), str(local_path(uri).absolute())
    try:
        return fsspec.core.url_to_fs(uri, **_storage_options(uri))
    except ImportError as exc:  # the scheme's filesystem package is not installed
        scheme = uri.split("://", 1)[0]
        extra = f" (pip install 'dreamfleet[{EXTRAS[scheme]}]')" if scheme in EXTRAS else ""
        raise StorageError(f"cannot use {redact(uri)}: {exc}{extra}") from None
    except (ValueError, OSError) as exc:  # an unknown scheme, an unresolvable host
        raise StorageError(f"cannot use {redact(uri)}: {type(exc).__name__}: {redact(str(exc))}") from None


def _storage_options(uri: str) -> dict[str, Any]:
    """Endpoint settings that are not secrets (an S3-compatible endpoint, a GCS emulator); the
    only place that reads the storage endpoint variables."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("DREAMFLEET_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {"client_kwargs": {"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}}
        if endpoint:
            kwargs["client_kwargs"]["endpoint_url"] = endpoint
        # fsspec keeps one instance per process and options (shared by threads: its calls run on
        # one IO loop), so the client and its connections are made once, not per call (~0.3 s each);
        # listings are never cached: the ledger and the claims must see other workers' writes
        kwargs["use_listings_cache"] = False
        # call() retries with backoff; botocore's own legacy retries (5 attempts, ~8 s) under each
        # of its attempts made a refused endpoint take 70 s to report, a black-holed one 6 min
        # as many pooled connections as the data check has reads in flight (botocore's default: 10)
        config: dict[str, Any] = {"connect_timeout": S3_CONNECT_TIMEOUT_S, "max_pool_connections": S3_CONNECTIONS}
        if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
            config["retries"] = {"total_max_attempts": 2, "mode": "standard"}
        kwargs["config_kwargs"] = config
        return kwargs
    if uri.startswith(("gs://", "gcs://")):
        # the emulator convention of Google's own clients: STORAGE_EMULATOR_HOST is the endpoint
        # and the credentials are anonymous (gcsfs reads the endpoint itself but would still look
        # for credentials, up to the metadata server); DREAMFLEET_GCS_ENDPOINT is an endpoint that
        # takes the usual credentials (application default, workload identity)
        kwargs = {"use_listings_cache": False}
        endpoint = os.environ.get("DREAMFLEET_GCS_ENDPOINT")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        elif os.environ.get("STORAGE_EMULATOR_HOST"):
            kwargs["token"] = "anon"
        return kwargs
    if uri.startswith(("az://", "abfs://", "abfss://")):
        # adlfs reads the account and credentials from AZURE_STORAGE_* itself; a connection string
        # (a credential) carries a non-default endpoint such as Azurite's. The SDK logs every
        # request and response at INFO, which would drown a worker's log (at INFO)
        logging.getLogger("azure").setLevel(max(logging.WARNING, logging.getLogger("azure").level))
        return {"use_listings_cache": False}
    return {}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ECONNREFUSED):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def call(uri: str, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    """Run one bucket operation with retries on transient errors."""
    attempts = attempts or RETRY_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # classified below; non-transient errors surface at once
            if not is_transient(exc) or attempt == attempts:
                if isinstance(exc, FileNotFoundError):
                    raise
                reason = redact(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                raise StorageError(f"cannot {what} {redact(uri)} after {attempt} attempt(s): {reason}") from exc
            delay = min(30.0, RETRY_BASE_S * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("transient error on %s %s (attempt %d/%d): %s; retrying in %.1fs",
                        what, redact(uri), attempt, attempts, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- basic operations


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return call(uri, "check", lambda: fs.exists(path))


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    return call(uri, "read", lambda: fs.cat_file(path))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str) -> Any | None:
    """The parsed JSON at uri, or None if there is none."""
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object. Local files are written to a temporary name and renamed (atomic);
    an object-store PUT is atomic by itself."""
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = _fs(uri)
    call(uri, "write", lambda: fs.pipe_file(path, data))


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write one object only if nothing is there yet; True if this call created it.

    The arbiter of the claim protocol (launcher.ledger), so it must be atomic, and it is the
    store's own primitive: a hard link of a complete temporary file on a local or shared POSIX
    filesystem, a conditional PUT (If-None-Match: *) on S3, an upload with the generation
    precondition ifGenerationMatch=0 on GCS, an upload with If-None-Match: * on Azure Blob
    (fsspec's mode="create" in s3fs, gcsfs and adlfs). Any other scheme has no such primitive
    and falls back to check-then-write, which only one worker may rely on: a fleet of more than
    one is refused there (require_exclusive_create). A PUT retried after a lost response finds
    its own bytes there: that counts as created."""
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
    fs, path = _fs(uri)

    def put() -> bool:
        if not has_exclusive_create(uri):  # one worker only (require_exclusive_create): check, write, read back
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return fs.cat_file(path) == data
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    return call(uri, "create", put) or read_bytes(uri) == data


EXCLUSIVE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")  # stores with a conditional create


def has_exclusive_create(uri: str) -> bool:
    return is_local(uri) or uri.split("://", 1)[0] in EXCLUSIVE_SCHEMES


def require_exclusive_create(uri: str, num_workers: int) -> None:
    """Refuse a fleet of more than one worker on a store where two workers could both win one
    claim (no conditional create); one worker alone never races."""
    if num_workers > 1 and not has_exclusive_create(uri):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"output {redact(uri)}: {scheme}:// has no exclusive create, which the claims of "
                           f"{num_workers} workers need; use a local or shared path, s3://, gs:// or az://, or one worker")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def list_names(uri: str) -> list[str]:
    """Names directly under uri (files and folders), sorted; [] when it does not exist."""
    fs, path = _fs(uri)
    try:
        entries = call(uri, "list", lambda: fs.ls(path, detail=False, refresh=True) if not is_local(uri) else fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/")})


def remove(uri: str) -> None:
    fs, path = _fs(uri)
    try:
        call(uri, "remove", lambda: fs.rm(path, recursive=True))
    except FileNotFoundError:
        pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_file(local: Path, uri: str) -> None:
    if is_local(uri):
        write_bytes(uri, Path(local).read_bytes())
        return
    fs, path = _fs(uri)
    call(uri, "upload", lambda: fs.put_file(str(local), path))


def download_file(uri: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{uuid.uuid4().hex[:8]}")
    fs, path = _fs(uri)
    call(uri, "download", lambda: fs.get_file(path, str(tmp)))
    os.replace(tmp, local)


# --------------------------------------------------------------------------- artifacts


def _walk(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def build_manifest(local_dir: Path, extra: dict | None = None) -> dict:
    files = {str(p.relative_to(local_dir)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _walk(local_dir)}
    return {"files": files, "created_at": time.time(), **(extra or {})}


def publish_dir(local_dir: str | Path, dest_uri: str, extra: dict | None = None) -> dict:
    """Upload a finished local folder to dest_uri; the manifest is written last, after the
    uploaded sizes are verified. Returns the manifest."""
    local_dir = Path(local_dir)
    manifest = build_manifest(local_dir, extra)
    # an older manifest must not vouch for files being replaced now
    remove(join(dest_uri, MANIFEST))
    for rel in manifest["files"]:
        upload_file(local_dir / rel, join(dest_uri, rel))
    fs, root = _fs(dest_uri)
    for rel, meta in manifest["files"].items():
        target = join(dest_uri, rel)
        _, path = _fs(target)
        size = call(target, "verify", lambda: fs.size(path))
        if size != meta["size"]:
            raise StorageError(f"upload of {redact(target)} is {size} bytes, expected {meta['size']}")
    write_json(join(dest_uri, MANIFEST), manifest)
    return manifest


def is_complete(uri: str) -> bool:
    return exists(join(uri, MANIFEST))


def fetch_dir(uri: str, local_dir: str | Path, verify: bool = True) -> dict:
    """Download a published folder (one with a manifest) and check every file's sha256."""
    manifest = read_json(join(uri, MANIFEST))
    if manifest is None:
        raise StorageError(f"{redact(uri)} has no {MANIFEST}: it is incomplete or was never published")
    local_dir = Path(local_dir)
    for rel, meta in manifest["files"].items():
        target = local_dir / rel
        download_file(join(uri, rel), target)
        if verify and sha256_file(target) != meta["sha256"]:
            raise StorageError(f"{redact(join(uri, rel))} does not match its manifest checksum")
    return manifest
