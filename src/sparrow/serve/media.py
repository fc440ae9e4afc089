"""Where the video of a request may come from.

A video part's url is a data URL (`data:video/mp4;base64,...`, always allowed: an upload) or a
local path (`file:///abs/path` or a plain path). Local paths are allowed only inside the
directories given with --media-root (none by default), checked twice: as written, with `..`
applied lexically (so nothing outside the roots, a symlink or not, a file or not, can change
the answer), and then with the symlinks inside the roots resolved. Every refusal is the same
403, so a client learns nothing about files outside the roots. Relative paths are taken from
the first root.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from sparrow.errors import SparrowError

FORBIDDEN = "video path is outside the server's media roots (see sparrow serve --media-root)"


class MediaError(SparrowError):
    """A video reference the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def resolve_local(reference: str, media_roots: list[Path]) -> Path:
    """The real path of a local video reference, if it lies inside a media root."""
    if not media_roots:
        raise MediaError(FORBIDDEN, 403)
    path = unquote(urlparse(reference).path) if reference.startswith("file://") else reference
    if "\x00" in path:
        raise MediaError(FORBIDDEN, 403)
    roots = [os.path.abspath(root) for root in media_roots]
    written = os.path.normpath(path if os.path.isabs(path) else os.path.join(roots[0], path))
    if not any(_within(written, root) for root in roots):
        raise MediaError(FORBIDDEN, 403)
    try:  # a symlink inside the roots may still point out of them
        real = os.path.realpath(written)
        inside = any(_within(real, os.path.realpath(root)) for root in roots)
        found = inside and os.path.isfile(real)
    except (OSError, ValueError):  # a name too long for the file system, ...
        inside, found = True, False
    if not inside:
        raise MediaError(FORBIDDEN, 403)
    if not found:
        raise MediaError(f"video file not found: {reference}", 400)
    return Path(real)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


EXAMPLES = {"video": "video/mp4, video/webm, ...", "image": "image/png, image/jpeg, ..."}


@contextmanager
def video_file(reference: str, media_roots: list[Path], max_bytes: int, kind: str = "video"):
    """Yield (path, sha256 hex) of the video (or, `kind` "image", the image) a url names; a
    data URL lives in a temporary file for the duration of the block."""
    if reference.startswith("data:"):
        header, sep, payload = reference.partition(",")
        if not sep or not header.endswith(";base64"):
            raise MediaError(f"a{'n' if kind == 'image' else ''} {kind} data URL must look like "
                             f"data:{EXAMPLES[kind].split(',')[0]};base64,<data>")
        mime = header[len("data:"):-len(";base64")]
        if not (mime.startswith(f"{kind}/") or mime in ("application/octet-stream", "")):
            raise MediaError(f"data URL type {mime!r} is not a{'n' if kind == 'image' else ''} {kind} "
                             f"(use {EXAMPLES[kind]})")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise MediaError(f"the {kind} data URL is not valid base64 ({error})") from error
        if len(data) > max_bytes:
            raise MediaError(f"the uploaded {kind} is over the {max_bytes} byte limit", 413)
        with tempfile.TemporaryDirectory(prefix="sparrow-upload-") as tmp:
            path = Path(tmp) / "upload.video"
            path.write_bytes(data)
            yield path, hashlib.sha256(data).hexdigest()
        return
    if urlparse(reference).scheme not in ("", "file"):
        raise MediaError(
            f"{kind} url must be a data: URL or a local path (file:///...); remote urls are not fetched"
        )
    path = resolve_local(reference, media_roots)
    yield path, _file_hash(path)


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
