"""Where an image's bytes come from: ``data:`` URIs, ``http(s)`` URLs, ``file://`` under one directory.

``load_image_bytes`` only gathers bytes and does cheap checks on the event loop; it never
decodes base64 or pixels (that is CPU work, done later in a worker thread by
``vl.image_pixels``). Every error is a ``MediaError`` naming the request field (``param``).
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
from dataclasses import dataclass

import trio

from vl.errors import (
    image_not_found,
    image_too_large,
    invalid_base64,
    invalid_image,
    invalid_image_url,
    media_url_forbidden,
    unsupported_image_url_scheme,
)
from vl.gates import BorrowTimes
from vl.image_fetcher import ImageFetcher
from vl.media_policy import MediaPolicy

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_SCHEME_PREFIX_CHARS = 32  # look only at the start of a (possibly many-megabyte) data URI
_DATA_MEDIA_TYPES_ACCEPTED = ("", "application/octet-stream")


@dataclass(frozen=True)
class EncodedImage:
    """An image's still-encoded bytes.

    ``payload`` is the file's bytes, or ASCII base64 text of them when ``base64_encoded``
    (a ``data:`` URI, not decoded yet). ``source`` is ``"data"``, ``"http"`` or ``"file"``.
    ``media_type`` is the type a ``data:`` URI declared (lower case), else ``None``; it is a
    hint, not trusted by the decoder.
    """

    payload: bytes
    base64_encoded: bool
    source: str
    media_type: str | None = None


async def load_image_bytes(
    url: str, *, param: str, fetcher: ImageFetcher, policy: MediaPolicy, times: BorrowTimes | None = None
) -> EncodedImage:
    """The encoded image that ``url`` names, within ``policy``; ``times`` (if given) gets
    the fetch limiter's times of an ``http(s)`` fetch (``ImageFetcher.fetch``).

    ``data:`` URIs must be base64 (``data:image/png;base64,...``, ``data:;base64,...``, and
    the non-standard ``data:base64,...``); their length is checked against
    ``policy.max_image_bytes`` without decoding. ``http``/``https`` go through ``fetcher``.
    ``file://`` URLs are served only from inside ``policy.allowed_local_media_path`` after
    resolving symlinks. Raises ``MediaError`` (``MediaTimeout`` for a slow fetch) naming
    ``param``; codes: ``invalid_image_url``, ``unsupported_image_url_scheme``,
    ``media_url_forbidden``, ``image_too_large``, ``image_not_found`` and the fetcher's.

    Cancellation: safe at any point. A fetch in progress is abandoned as ``ImageFetcher.fetch``
    describes; a local file read already handed to a worker thread finishes first (it is
    bounded by the byte cap) and its file is closed.
    """
    match = _SCHEME.match(url[:_SCHEME_PREFIX_CHARS]) if isinstance(url, str) else None
    if match is None:
        raise invalid_image_url("image URL has no scheme (expected data:, http(s): or file:)", param)
    scheme = match.group(1).lower()
    if scheme == "data":
        return parse_data_uri(url, policy, param=param)
    if scheme in ("http", "https"):
        return EncodedImage(
            payload=await fetcher.fetch(url, param=param, times=times), base64_encoded=False, source="http"
        )
    if scheme == "file":
        return await _load_local_file(url, policy, param=param)
    raise unsupported_image_url_scheme(scheme, param)


def parse_data_uri(url: str, policy: MediaPolicy, *, param: str) -> EncodedImage:
    """The still-base64 payload of a ``data:`` URI, after checking its header and length.

    Accepts an ``image/*`` or ``application/octet-stream`` media type, or none, with optional
    parameters (``;charset=...``) before ``;base64``. Work is proportional to the header, plus
    one ASCII copy of the payload.
    """
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise invalid_image_url("data URI has no ',' before its data", param)
    fields = [field.strip().lower() for field in header.split(";")]
    media_type, options = fields[0], fields[1:]
    if media_type == "base64" and not options:  # tolerated: data:base64,...
        media_type, options = "", ["base64"]
    if not options or options[-1] != "base64":
        raise invalid_image_url("data URI images must be base64-encoded (';base64,')", param)
    if not (media_type.startswith("image/") or media_type in _DATA_MEDIA_TYPES_ACCEPTED):
        raise invalid_image_url(f"data URI media type {media_type!r} is not an image type", param)
    if not payload:
        raise invalid_image("data URI contains no image data", param)
    cap = policy.max_image_bytes
    if len(payload) > 4 * -(-cap // 3):  # the longest base64 text of at most `cap` bytes
        raise image_too_large(cap, param)
    try:
        data = payload.encode("ascii")
    except UnicodeEncodeError as exc:
        raise invalid_base64(param) from exc
    return EncodedImage(payload=data, base64_encoded=True, source="data", media_type=media_type or None)


async def _load_local_file(url: str, policy: MediaPolicy, *, param: str) -> EncodedImage:
    """A regular file's bytes, if it lies inside ``policy.allowed_local_media_path``."""
    if policy.allowed_local_media_path is None:
        raise media_url_forbidden("file:// image URLs are not enabled on this server", param)
    path = _file_url_path(url, param)
    root = await trio.Path(policy.allowed_local_media_path).resolve()
    resolved = await trio.Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise media_url_forbidden("file:// image URL is outside the allowed local media directory", param)
    data = await _read_regular_file(resolved, policy.max_image_bytes, param)
    return EncodedImage(payload=data, base64_encoded=False, source="file")


def _file_url_path(url: str, param: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise invalid_image_url("file:// image URLs must not name a host", param)
    if parts.query or parts.fragment:
        raise invalid_image_url("file:// image URLs take no query or fragment", param)
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise invalid_image_url("file:// image URL must name an absolute path", param)
    return path


async def _read_regular_file(path: trio.Path, cap: int, param: str) -> bytes:
    """At most ``cap`` bytes of the regular file at ``path`` (already resolved; not followed again)."""
    try:
        async with await trio.open_file(path, "rb", opener=_open_no_follow) as file:
            info = os.fstat(file.fileno())  # on the descriptor we read: no stat/open race
            if not stat.S_ISREG(info.st_mode):
                raise invalid_image_url("file:// image URL does not name a regular file", param)
            if info.st_size > cap:
                raise image_too_large(cap, param)
            data = await file.read(cap + 1)
    except FileNotFoundError as exc:
        raise image_not_found(param) from exc
    except OSError as exc:
        raise invalid_image_url("local image file could not be read", param) from exc
    if len(data) > cap:  # the file grew after fstat
        raise image_too_large(cap, param)
    return data


def _open_no_follow(path: str, flags: int) -> int:
    """``os.open`` that refuses a symlink swapped in after resolution and never blocks on a FIFO."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
