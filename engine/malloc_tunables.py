"""glibc malloc settings for the processes that handle image-sized buffers: the engine
worker (through ``GLIBC_TUNABLES`` in the environment it is started with) and the prep
worker processes (applied with ``mallopt`` when they start, since trio-parallel starts
them with the server's own environment).

With glibc's defaults a freed block of 32 MiB or less may be mmap'd or trimmed off the
heap and refaulted page by page when the next one is allocated: a real-size image's 25 MiB
of pixels, its decoded and resized arrays, attention and KV-gather buffers. In a real-size
image burst a fifth of the engine worker's CPU and of the prep processes' went to the
kernel that way (bench/README.md, "Refaulted memory and threads for large images").

Light: imports nothing heavy (``ctypes`` only inside ``apply_tunables``).
"""

from __future__ import annotations

from collections.abc import Mapping

# One arena (a process allocates from the heap it returns to), everything up to 32 MiB
# (glibc's largest mmap threshold) from the heap, and no trimming: the process's memory
# stays at its high-water mark (docs/architecture.md, "Processes"; transparent huge pages
# on top, glibc.malloc.hugetlb=1, cost text a little engine CPU and gained images nothing
# measurable).
WORKER_MALLOC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
)

# the ``mallopt`` parameter (malloc.h) of each tunable that has one
_MALLOPT_PARAMS = {
    "glibc.malloc.trim_threshold": -1,  # M_TRIM_THRESHOLD
    "glibc.malloc.top_pad": -2,  # M_TOP_PAD
    "glibc.malloc.mmap_threshold": -3,  # M_MMAP_THRESHOLD
    "glibc.malloc.mmap_max": -4,  # M_MMAP_MAX
    "glibc.malloc.perturb": -6,  # M_PERTURB
    "glibc.malloc.arena_test": -7,  # M_ARENA_TEST
    "glibc.malloc.arena_max": -8,  # M_ARENA_MAX
}
_INT_MAX = (1 << 31) - 1  # mallopt takes an int


def _settings(tunables: str) -> list[tuple[str, str]]:
    """(name, value) of each setting of a GLIBC_TUNABLES string, in order."""
    return [(name, value) for name, _, value in (item.partition("=") for item in tunables.split(":") if item)]


def merged_tunables(own: str, added: str) -> str:
    """``own`` GLIBC_TUNABLES followed by those of ``added`` whose names ``own`` does not set:
    each name appears once, so the value glibc applies for it is the environment's own."""
    named = {name for name, _ in _settings(own)}
    pairs = [item for item in own.split(":") if item]
    pairs += [item for item in added.split(":") if item and item.partition("=")[0] not in named]
    return ":".join(pairs)


def apply_tunables(tunables: str, environ: Mapping[str, str]) -> dict[str, int]:
    """Apply to this running process, with glibc's ``mallopt``, each setting of
    ``tunables`` (GLIBC_TUNABLES syntax) that has a ``mallopt`` parameter and that
    ``environ``'s own ``GLIBC_TUNABLES`` does not set (glibc applied those at start; they
    are kept, as ``merged_tunables`` keeps them). Values above an int's range are clamped
    to it. Returns what was applied, by name: nothing where the C library is not glibc.
    Call it early, before the process has allocated much."""
    import ctypes

    own = {name for name, _ in _settings(environ.get("GLIBC_TUNABLES", ""))}
    wanted = {
        name: min(int(value), _INT_MAX)
        for name, value in _settings(tunables)
        if name in _MALLOPT_PARAMS and name not in own and value.isdigit()
    }
    if not wanted:
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # a C library without mallopt (not glibc): nothing to set
        return {}
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return {name: value for name, value in wanted.items() if mallopt(_MALLOPT_PARAMS[name], value) == 1}
