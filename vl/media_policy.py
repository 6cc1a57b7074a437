"""What vlserve accepts as an image: sources, sizes, fetch limits. One frozen value, shared read-only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # vl does not import server at run time; only the type is needed here.
    from server.config import ServerConfig


@dataclass(frozen=True)
class MediaPolicy:
    """Limits and SSRF rules for image inputs.

    The defaults are those of ``ServerConfig``. Construction validates every field and raises
    ``ValueError`` for a policy that cannot be enforced (non-positive limits, a relative local
    path). ``allowed_media_domains`` is normalised to lower case without a trailing dot, so
    membership tests are exact host matches on the form ``httpx`` gives a URL's host.
    """

    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    allow_private_media_urls: bool = False
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024
    max_images_per_request: int = 8
    fetch_timeout: float = 10.0
    fetch_concurrency: int = 16
    max_redirects: int = 3

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request", "fetch_concurrency"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("max_redirects", self.max_redirects, minimum=0)
        timeout = self.fetch_timeout
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"MediaPolicy.fetch_timeout must be a positive finite number, got {timeout!r}")
        if self.allowed_local_media_path is not None and not self.allowed_local_media_path.startswith("/"):
            raise ValueError("MediaPolicy.allowed_local_media_path must be an absolute path")
        if isinstance(self.allowed_media_domains, str):
            raise ValueError("MediaPolicy.allowed_media_domains must be a sequence of host names, not a string")
        domains = tuple(normalise_host(domain) for domain in self.allowed_media_domains)
        object.__setattr__(self, "allowed_media_domains", domains)

    @classmethod
    def from_config(cls, config: ServerConfig) -> MediaPolicy:
        """The policy a server started with ``config`` enforces."""
        return cls(
            allowed_local_media_path=config.allowed_local_media_path,
            allowed_media_domains=tuple(config.allowed_media_domains),
            allow_private_media_urls=config.allow_private_media_urls,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            max_images_per_request=config.max_images_per_request,
            fetch_timeout=config.image_fetch_timeout,
            fetch_concurrency=config.image_fetch_concurrency,
            max_redirects=config.max_image_redirects,
        )

    def is_allowed_domain(self, host: str) -> bool:
        """Whether ``host`` is listed in ``allowed_media_domains`` (exact match, case-insensitive)."""
        return normalise_host(host) in self.allowed_media_domains


def normalise_host(host: str) -> str:
    """``host`` in lower case, without brackets around an IPv6 literal or a trailing dot."""
    return host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MediaPolicy.{name} must be an integer >= {minimum}, got {value!r}")
