"""Image loading as LMDeploy does it: one blocking call per image, fetch and decode together.

``ImageLoader.load`` runs in the event loop's default thread pool in both baselines. It
fetches ``http(s)`` URLs with one shared synchronous ``httpx.Client`` (thread-safe, pooled)
and decodes with vlserve's own ``decode_image``, so only the concurrency layout differs.
"""

from __future__ import annotations

import httpx
from PIL import Image

from vl.errors import MediaError
from vl.image_pixels import decode_image
from vl.image_source import EncodedImage, parse_data_uri
from vl.media_policy import MediaPolicy


class ImageLoader:
    def __init__(self, policy: MediaPolicy) -> None:
        self._policy = policy
        self._client = httpx.Client(timeout=policy.fetch_timeout, follow_redirects=True)

    def load(self, url: str, param: str) -> Image.Image:
        """The decoded RGB image ``url`` names. Blocking; raises ``MediaError``."""
        if url.startswith("data:"):
            encoded = parse_data_uri(url, self._policy, param=param)
        elif url.startswith(("http://", "https://")):
            encoded = EncodedImage(payload=self._fetch(url, param), base64_encoded=False, source="http")
        else:
            raise MediaError("only data: and http(s) image URLs are supported", param=param, code="invalid_image_url")
        return decode_image(encoded, self._policy, param=param)

    def _fetch(self, url: str, param: str) -> bytes:
        try:
            response = self._client.get(url)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise MediaError(f"could not fetch the image: {exc}", param=param, code="image_fetch_failed") from None
        if len(response.content) > self._policy.max_image_bytes:
            raise MediaError("image is too large", param=param, code="image_too_large")
        return response.content

    def close(self) -> None:
        self._client.close()
