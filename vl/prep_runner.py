"""Where a request's preparation work runs: ``PrepRunner`` and its in-thread form.

The preparer names a ``PrepTools`` method and the gate that limits it; a runner runs the
method holding one token of that gate. ``ThreadPrep`` uses worker threads of the server
process (they share its GIL with the event loop); ``vl.prep_processes.ProcessPrep`` uses
prep worker processes. Gates, their statistics and their cancellation guarantees are the
same for both (see ``vl.gates``).
"""

from __future__ import annotations

from typing import Any, Protocol

from vl.gates import Gate
from vl.prep_tools import PrepTools


class PrepRunner(Protocol):
    async def run(self, gate: Gate, method: str, *args: Any) -> Any:
        """Run ``PrepTools.<method>(*args)`` holding a token of ``gate``; return or raise
        its outcome. Cancellation: as ``Gate.run`` (work that started is finished)."""
        ...


class ThreadPrep:
    """Runs ``PrepTools`` methods in worker threads of the server process."""

    def __init__(self, tools: PrepTools) -> None:
        self.tools = tools

    async def run(self, gate: Gate, method: str, *args: Any) -> Any:
        return await gate.run(getattr(self.tools, method), *args)
