"""The benchmark's workloads: which chat messages request number ``i`` sends.

``text``: a synthetic prompt of varied length. ``image-base64``: one unique 1024² JPEG as a
``data:`` URI. ``image-url``: the same image by URL from the loopback image server.
``mixed``: text, base64 and URL requests in turn.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from bench.workloads.image_store import ImageStore
from bench.workloads.text_prompts import image_question, text_prompt

WORKLOADS = ("text", "image-base64", "image-url", "mixed")
_MIXED_ORDER = ("text", "image-base64", "image-url")


def uses_images(workload: str) -> bool:
    return workload != "text"


def uses_image_server(workload: str) -> bool:
    return workload in ("image-url", "mixed")


@dataclass(frozen=True)
class Workload:
    """Builds the messages of each request of one workload.

    ``images`` must hold every index asked for (``ImageStore.ensure``) for image workloads;
    ``image_base_url`` is the image server's URL for ``image-url`` and ``mixed``.
    """

    name: str
    images: ImageStore | None = None
    image_base_url: str | None = None

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"unknown workload {self.name!r}; choose from {', '.join(WORKLOADS)}")
        if uses_images(self.name) and self.images is None:
            raise ValueError(f"workload {self.name!r} needs an image store")
        if uses_image_server(self.name) and not self.image_base_url:
            raise ValueError(f"workload {self.name!r} needs the image server's URL")

    def kind_of(self, index: int) -> str:
        """``text``, ``image-base64`` or ``image-url``: what request ``index`` is."""
        if self.name == "mixed":
            return _MIXED_ORDER[index % len(_MIXED_ORDER)]
        return self.name

    def messages(self, index: int) -> list[dict]:
        """The ``messages`` of request ``index`` (reads image files for base64 requests)."""
        kind = self.kind_of(index)
        if kind == "text":
            return [{"role": "user", "content": text_prompt(index)}]
        if kind == "image-base64":
            url = "data:image/jpeg;base64," + base64.b64encode(self.images.read(index)).decode("ascii")
        else:
            url = f"{self.image_base_url}/{index}.jpg"
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": image_question(index)},
                ],
            }
        ]
