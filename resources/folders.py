"""Checkpoint, adapter and projection folders: in the state folder, or published to object storage.

A folder is named by the hash of its content (``models/<hash>``, ``adapters/<hash>``,
``projections/<hash>``), so a name always means the same bytes. With ``$DATAWORTH_MODELS_ROOT`` set to an
``s3://bucket/prefix`` URI, `publish` uploads the folder to ``<root>/<kind>/<name>/`` and returns that URI
for the Delta row; `local_folder` gives any process (another worker, another machine) a local copy in its
own state folder, downloaded once into ``<state folder>/<kind>/<name>`` through a staging folder so that a
half-downloaded copy is never seen. Readers re-hash what they load (`domain.artifacts`), so a copy that
changed is refused, not used. Credentials and endpoint come from the usual ``AWS_*`` variables.
Without the variable, folders stay in the state folder and rows store their path (`stored_path`).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlparse

from resources.state import dataworth_home, is_uri, stored_path, stored_path_to_local

MODELS_ROOT_ENV = "DATAWORTH_MODELS_ROOT"
KINDS = ("models", "adapters", "projections")
COMPLETE = ".dataworth-complete"  # uploaded after every file of a folder; a folder without it is not read
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class FolderStoreError(Exception):
    """A folder cannot be published to or fetched from object storage."""


def models_location() -> str | None:
    """``$DATAWORTH_MODELS_ROOT`` (an ``s3://bucket/prefix`` URI) without a trailing slash, or None when
    folders stay in the state folder."""
    root = os.environ.get(MODELS_ROOT_ENV, "").strip().rstrip("/") or None
    if root is not None and not (root.startswith("s3://") and urlparse(root).netloc):
        raise FolderStoreError(
            f"${MODELS_ROOT_ENV}={root!r} is not an s3://bucket/prefix URI; checkpoints and projections can be "
            "published only to S3 (or an S3-compatible store through AWS_ENDPOINT_URL); fix it or unset it"
        )
    return root


def _s3(uri: str):
    """(pyarrow S3 filesystem, ``bucket/key`` path) for an ``s3://`` URI, configured from the AWS_* variables."""
    from pyarrow import fs

    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise FolderStoreError(f"{uri!r} is not an s3://bucket/key URI; re-materialize the asset that wrote it")
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    options = {
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID") or None,
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        "session_token": os.environ.get("AWS_SESSION_TOKEN") or None,
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
    }
    if endpoint:
        target = urlparse(endpoint)
        options |= {"endpoint_override": target.netloc or target.path, "scheme": target.scheme or "https"}
    filesystem = fs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})
    return filesystem, f"{parsed.netloc}{parsed.path}".rstrip("/")


def publish(local: Path, kind: str, name: str) -> str:
    """How a Delta row names folder `local`: uploaded to ``<models root>/<kind>/<name>`` when the root is
    an object store (the returned URI), else its `stored_path`. Uploading a name that is there is a no-op."""
    root = models_location()
    if root is None:
        return stored_path(local)
    _check(kind, name)
    from pyarrow import fs

    uri = f"{root}/{kind}/{name}"
    filesystem, target = _s3(uri)
    try:
        if filesystem.get_file_info(f"{target}/{COMPLETE}").type == fs.FileType.File:
            return uri  # the same content is there already
        fs.copy_files(str(local), target, destination_filesystem=filesystem, use_threads=True)
        with filesystem.open_output_stream(f"{target}/{COMPLETE}") as marker:  # written last
            marker.write(b"")
    except OSError as error:
        raise FolderStoreError(f"cannot upload {local} to {uri}: {error}") from error
    return uri


def local_folder(stored: str) -> Path:
    """The local folder a Delta row's stored value names: a path (see `stored_path_to_local`), or a
    ``<root>/<kind>/<name>`` URI, fetched once into ``<state folder>/<kind>/<name>``."""
    if not is_uri(stored):
        return stored_path_to_local(stored)
    kind, name = stored.rstrip("/").rsplit("/", 2)[-2:]
    _check(kind, name)
    local = dataworth_home() / kind / name
    if local.is_dir():
        return local
    from pyarrow import fs

    filesystem, source = _s3(stored)
    staging = local.parent / f".fetching-{name}-{uuid.uuid4().hex[:8]}"
    try:
        if filesystem.get_file_info(f"{source}/{COMPLETE}").type != fs.FileType.File:
            raise FolderStoreError(
                f"{stored} is missing or was not fully uploaded; re-materialize the asset that wrote it"
            )
        staging.mkdir(parents=True)
        fs.copy_files(source, str(staging), source_filesystem=filesystem, use_threads=True)
        (staging / COMPLETE).unlink(missing_ok=True)
        try:
            staging.rename(local)
        except OSError:  # another process of this machine fetched it first
            if not local.is_dir():
                raise
    except OSError as error:
        raise FolderStoreError(f"cannot download {stored} to {local}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _check(kind: str, name: str) -> None:
    if kind not in KINDS or not _NAME.match(name):
        raise FolderStoreError(f"{kind}/{name} is not a published folder name (<{'|'.join(KINDS)}>/<hash>)")
