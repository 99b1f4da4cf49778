"""Node-local staging of a remote model (s3://, gs://, az://) for `from_pretrained`.

Each file is downloaded once per node: the ranks of a node take a file lock, the first one
downloads, the others find the files verified and reuse them, and so do later jobs. A file is
current when its size and ETag (or checksum) match the bucket's listing; a changed object is
downloaded again, and a fresh download is checked against its size and, for a single-part S3
object, the MD5 its ETag carries. Downloads go to a temporary name and are renamed into place, so a killed
worker never leaves a truncated file that looks staged.

The cache directory: model.cache_dir, else $DREAMFLEET_CACHE_DIR, else ~/.cache/dreamfleet/models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from filelock import FileLock

from launcher import storage

log = logging.getLogger(__name__)
STAMP = ".dreamfleet-staged.json"
LOCK_TIMEOUT_S = float(os.environ.get("DREAMFLEET_STAGE_LOCK_TIMEOUT_S", "3600"))


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("DREAMFLEET_CACHE_DIR") or Path.home() / ".cache" / "dreamfleet" / "models")


def _identity(info: dict) -> str:
    """What changes when the object changes: ETag, else a checksum, else mtime."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "content_md5", "mtime", "LastModified", "last_modified"):
        if info.get(key):
            return str(info[key]).strip('"')
    return ""


def remote_listing(source: str) -> dict[str, dict]:
    """{relative path: {size, id}} of every file under a remote folder."""
    fs, root = storage._fs(source)
    found = storage.call(source, "list", lambda: fs.find(root, detail=True, withdirs=False))
    root = root.rstrip("/") + "/"
    return {path[len(root):]: {"size": int(info.get("size") or 0), "id": _identity(info)}
            for path, info in found.items() if path.startswith(root)}


def _check(path: Path, meta: dict) -> str | None:
    """Why a downloaded file does not match the bucket's listing, or None. A single-part S3 ETag
    is the object's MD5, so it is checked too; a multipart ETag ("...-N") is not a content hash."""
    if path.stat().st_size != meta["size"]:
        return f"is {path.stat().st_size} bytes, expected {meta['size']}"
    etag = meta["id"]
    if len(etag) == 32 and all(ch in "0123456789abcdef" for ch in etag.lower()):
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != etag.lower():
            return "does not match its ETag (MD5)"
    return None


def stage_model(source: str, cache_dir: str | None = None) -> Path:
    """A local directory mirroring `source`, downloading only what is missing or changed."""
    base = cache_root(cache_dir)
    base.mkdir(parents=True, exist_ok=True)
    name = source.rstrip("/").rsplit("/", 1)[-1] or "model"
    dest = base / f"{name}-{hashlib.sha256(storage.redact(source).rstrip('/').encode()).hexdigest()[:12]}"
    with FileLock(str(dest) + ".lock", timeout=LOCK_TIMEOUT_S):
        listing = remote_listing(source)
        if not listing:
            from launcher.errors import InputError

            raise InputError(f"model.source {storage.redact(source)} holds no files")
        stamp_path = dest / STAMP
        staged = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        fetched = reused = nbytes = 0
        for rel, meta in sorted(listing.items()):
            target = dest / rel
            current = staged.get(rel) == meta and target.is_file() and target.stat().st_size == meta["size"]
            if current:
                reused += 1
                continue
            storage.download_file(storage.join(source, rel), target)
            problem = _check(target, meta)
            if problem:
                target.unlink()
                raise storage.StorageError(f"download of {storage.redact(storage.join(source, rel))} {problem}")
            staged[rel] = meta
            stamp_path.parent.mkdir(parents=True, exist_ok=True)
            stamp_path.write_text(json.dumps(staged, sort_keys=True))  # after each file: progress survives a kill
            fetched += 1
            nbytes += meta["size"]
        log.info("staged %s in %s: downloaded %d file(s) (%d bytes), reused %d", storage.redact(source), dest,
                 fetched, nbytes, reused)
    return dest
