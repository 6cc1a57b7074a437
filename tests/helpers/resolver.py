"""A scripted hostname resolver for trio (``trio.socket.set_custom_hostname_resolver``).

Lets tests give a name the answers an attacker's DNS would: a private address, a mix, or a
different address on each lookup (DNS rebinding). Scoped to the current ``trio.run``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

import trio


class ScriptedResolver(trio.abc.HostnameResolver):
    """Answers ``getaddrinfo`` for a name from a script: the n-th lookup gets ``script[name][n]``
    (the last entry repeats). Unknown names fail like a real resolver. ``lookups`` counts calls."""

    def __init__(self, script: Mapping[str, Sequence[Sequence[str]]]) -> None:
        self._script = {name: [list(answer) for answer in answers] for name, answers in script.items()}
        self.lookups: dict[str, int] = {}

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        await trio.lowlevel.checkpoint()
        name = host.decode("ascii") if isinstance(host, bytes) else str(host)
        answers = self._script.get(name)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        count = self.lookups.get(name, 0)
        self.lookups[name] = count + 1
        port_number = int(port.decode() if isinstance(port, bytes) else port or 0)
        return [_info(address, port_number) for address in answers[min(count, len(answers) - 1)]]

    async def getnameinfo(self, sockaddr, flags):
        raise NotImplementedError("ScriptedResolver only resolves names to addresses")


def _info(address: str, port: int):
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
