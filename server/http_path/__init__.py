"""hypercorn's trio HTTP path with fewer scheduler passes per request (``serve``).

A probe's latency under load is about the scheduler passes it needs times the length of
a pass (bench/README.md). hypercorn 0.18's trio path needs about nine passes for one
keep-alive request and more on a fresh connection; the subclasses here remove the passes
that only come from how hypercorn waits and writes, each change documented where it is
made, and answer probes inside the HTTP/1.1 protocol:

- ``serve``: ``hypercorn.trio.serve`` on ``FastTCPServer`` connections.
- ``FastTCPServer`` (connection.py): reads, idle timer, send lock, empty writes.
- ``NoWaitTaskGroup`` (task_group.py): the app's queue fed without a checkpoint.
- ``FastH11Protocol`` (protocol.py): one write per response; probes via ``ProbeStream``.
- ``ProbeLane`` (probe_lane.py): probes answered by a thread of their own, off the loop;
  every other connection handed to the loop.
- ``ProbePassLog`` (probe_passes.py): passes per probe, for the benchmark.

Written against hypercorn 0.18.0 (pinned in pyproject.toml; tests/server/test_http_path_pin.py
fails if the overridden internals change). ``vlserve serve`` uses this path; plain
``hypercorn --worker-class trio 'server.app:create_app()'`` uses hypercorn's own.
"""

from server.http_path.probe_passes import PROBE_PASSES_FILE_ENV, ProbePassLog
from server.http_path.serve import serve

__all__ = ["PROBE_PASSES_FILE_ENV", "ProbePassLog", "serve"]
