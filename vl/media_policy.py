"""What vlserve accepts as an image: sources, sizes, fetch limits. One frozen value, shared read-only."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MediaPolicy:
    """Limits and SSRF rules for image inputs: the media part of the server's configuration.

    Each field's ``help`` metadata documents it; ``server.options`` turns the fields into
    CLI flags and ``VLSERVE_*`` variables (``option`` metadata names the flag where it
    differs from the field). Construction validates every field and raises
    ``ValueError`` for a policy that cannot be enforced (non-positive limits, a relative local
    path). ``allowed_media_domains`` is normalised to lower case without a trailing dot, so
    membership tests are exact host matches on the form ``httpx`` gives a URL's host.
    """

    allowed_local_media_path: str | None = field(
        default=None, metadata={"help": "absolute directory that file:// image URLs may read from (default: none)"}
    )
    allowed_media_domains: tuple[str, ...] = field(
        default=(), metadata={"help": "hosts image URLs may name even if they resolve to private addresses"}
    )
    allow_private_media_urls: bool = field(
        default=False, metadata={"help": "let image URLs reach loopback and private addresses"}
    )
    max_image_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "largest image in bytes"})
    max_image_pixels: int = field(default=64 * 1024 * 1024, metadata={"help": "largest image in pixels"})
    max_images_per_request: int = field(default=8, metadata={"help": "images one request may carry"})
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "most pixels an image is resized to for the vision tower (one token per (patch x merge)² "
            "pixels); requests may ask for less (mm_processor_kwargs, detail); default: the image processor's, "
            "capped so that one image fills at most half the context"
        },
    )
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "fewest pixels an image is resized to for the vision tower (default: the image processor's)"},
    )
    fetch_timeout: float = field(
        default=10.0, metadata={"option": "image_fetch_timeout", "help": "seconds one image URL may take to fetch"}
    )
    fetch_concurrency: int = field(
        default=16, metadata={"option": "image_fetch_concurrency", "help": "image URLs fetched at once"}
    )
    max_redirects: int = field(
        default=3, metadata={"option": "max_image_redirects", "help": "redirects followed when fetching an image"}
    )

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request", "fetch_concurrency"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("max_redirects", self.max_redirects, minimum=0)
        for name in ("max_pixels", "min_pixels"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
        if self.max_pixels is not None and self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError("MediaPolicy.min_pixels must not be above max_pixels")
        timeout = self.fetch_timeout
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"MediaPolicy.fetch_timeout must be a positive finite number, got {timeout!r}")
        if self.allowed_local_media_path is not None and not self.allowed_local_media_path.startswith("/"):
            raise ValueError("MediaPolicy.allowed_local_media_path must be an absolute path")
        if isinstance(self.allowed_media_domains, str):
            raise ValueError("MediaPolicy.allowed_media_domains must be a sequence of host names, not a string")
        domains = tuple(normalise_host(domain) for domain in self.allowed_media_domains)
        object.__setattr__(self, "allowed_media_domains", domains)

    def is_allowed_domain(self, host: str) -> bool:
        """Whether ``host`` is listed in ``allowed_media_domains`` (exact match, case-insensitive)."""
        return normalise_host(host) in self.allowed_media_domains


def normalise_host(host: str) -> str:
    """``host`` in lower case, without brackets around an IPv6 literal or a trailing dot."""
    return host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MediaPolicy.{name} must be an integer >= {minimum}, got {value!r}")
