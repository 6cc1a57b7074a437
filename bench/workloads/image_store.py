"""A directory of benchmark images, ``<index>.jpg``, made once and reused across runs.

The load generator makes the images it needs before a run (never during one) and the
loopback image server serves the same files, so base64 and URL requests carry the same
bytes. Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.workloads.natural_image import NaturalImageMaker


def default_image_dir(size: int) -> Path:
    """The user cache directory for images of ``size`` pixels a side."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlserve-bench" / f"natural-{size}"


class ImageStore:
    def __init__(self, directory: Path, size: int = 1024) -> None:
        self.directory = Path(directory)
        self.size = size

    def path(self, index: int) -> Path:
        return self.directory / f"{index}.jpg"

    def read(self, index: int) -> bytes:
        """The bytes of image ``index``; it must have been made by ``ensure``."""
        return self.path(index).read_bytes()

    def ensure(self, indices: range | list[int], *, threads: int = 2) -> int:
        """Make every missing image among ``indices``; return how many were made.

        Blocking (tens of milliseconds per image): call it from a worker thread when an
        event loop is running.
        """
        missing = [i for i in indices if not self.path(i).exists()]
        if not missing:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        maker = NaturalImageMaker(self.size)

        def make(index: int) -> None:
            target = self.path(index)
            staging = target.with_suffix(f".{os.getpid()}.tmp")
            staging.write_bytes(maker.jpeg(index))
            os.replace(staging, target)

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-images") as pool:
            list(pool.map(make, missing))
        return len(missing)
