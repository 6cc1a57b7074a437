"""hypercorn's HTTP/1.1 protocol with one write per response and probes answered in place.

``FastH11Protocol`` changes two things in ``hypercorn.protocol.h11.H11Protocol``:

- The response head is held until the first body chunk (or the end of the response) and
  written together with it, and nothing is written for an empty chunk (the end of a
  ``Content-Length`` body is zero bytes in h11). hypercorn writes head, body and an
  empty end as three writes, each a lock acquire plus ``send_all``: two scheduler passes
  apiece. ASGI allows a server to hold the head until the first body message.
- A ``GET``/``HEAD`` of a probe path (``server.probes``) gets a ``ProbeStream`` instead of
  an ``HTTPStream``: the reply is written from the read task, with no app task at all.

``FastProtocolWrapper`` is hypercorn's ``ProtocolWrapper`` building ``FastH11Protocol`` for
HTTP/1.1 (HTTP/2 is left to hypercorn's own protocol).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import h11
from hypercorn.events import Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol

from server.http_path.probe_stream import ProbeStream
from server.probes import PROBE_PATHS, ProbeResponder


class ProbeHooks:
    """What the protocol needs to answer probes: the responder, and a callback run just
    before each ``/health`` or ``/ready`` reply is written (not ``/metrics``'s; ``fresh`` is
    true for a connection's first request)."""

    def __init__(self, responder: ProbeResponder, on_reply: Callable[[bool], None] | None = None) -> None:
        self.responder = responder
        self.on_reply = on_reply


class FastH11Protocol(H11Protocol):
    """See the module docstring. ``probes=None`` answers probes through the app as usual."""

    def __init__(self, *args: Any, probes: ProbeHooks | None = None) -> None:
        super().__init__(*args)
        self._probes = probes
        self._unsent_head = b""

    async def stream_send(self, event: Any) -> None:
        """Hold a final response head until the body; skip empty writes (see module doc)."""
        if isinstance(event, Response) and event.status_code >= 200:
            headers = [*event.headers, *self.config.response_headers("h11")]
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            self._unsent_head += self._h11_bytes(h11.Response(headers=headers, status_code=event.status_code))
        elif isinstance(event, Body):
            await self._write(self._h11_bytes(h11.Data(data=event.data)))
        elif isinstance(event, EndBody):
            await self._write(self._h11_bytes(h11.EndOfMessage()))
        else:
            await self._write(b"")  # a held head goes out before anything else
            await super().stream_send(event)

    def _h11_bytes(self, event: Any) -> bytes:
        """``event`` serialised by h11 (as ``_send_h11_event``, without sending it)."""
        try:
            return self.connection.send(event) or b""
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return b""

    async def _write(self, data: bytes) -> None:
        data, self._unsent_head = self._unsent_head + data, b""
        if data:
            await self.send(RawData(data=data))

    async def _create_stream(self, request: h11.Request) -> None:
        """A ``ProbeStream`` for a probe, else hypercorn's stream."""
        method = request.method.decode("ascii").upper()
        raw_path, _, query = request.target.partition(b"?")
        path = unquote(raw_path.decode("ascii"))
        if (
            self._probes is None
            or not self._probes.responder.is_probe(method, path)
            or self.config.server_names  # hypercorn's server-name check needs its stream
            or self.config.h11_pass_raw_headers
        ):
            await super()._create_stream(request)
            return
        fresh = self.keep_alive_requests == 0
        on_reply = self._probes.on_reply
        headers = list(request.headers)

        def scope() -> dict[str, Any]:  # for the access log only
            return {
                "type": "http",
                "http_version": request.http_version.decode(),
                "method": method,
                "scheme": "https" if self.ssl else "http",
                "path": path,
                "raw_path": raw_path,
                "query_string": query,
                "root_path": self.config.root_path,
                "headers": headers,
                "client": self.client,
                "server": self.server,
            }

        self.stream = ProbeStream(  # type: ignore[assignment]
            self._probes.responder,
            self.config,
            self.stream_send,
            STREAM_ID,
            method=method,
            path=path,
            headers=headers,
            scope=scope,
            on_reply=None if on_reply is None or path not in PROBE_PATHS else (lambda: on_reply(fresh)),
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()


class FastProtocolWrapper(ProtocolWrapper):
    """``ProtocolWrapper`` whose HTTP/1.1 protocol is ``FastH11Protocol``."""

    def __init__(
        self,
        app: Any,
        config: Any,
        context: Any,
        task_group: Any,
        state: Any,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
        alpn_protocol: str | None = None,
        *,
        probes: ProbeHooks | None = None,
    ) -> None:
        # ProtocolWrapper.__init__ would build a stock H11Protocol first; set its fields here.
        self.app = app
        self.config = config
        self.context = context
        self.task_group = task_group
        self.ssl = ssl
        self.client = client
        self.server = server
        self.send = send
        self.state = state
        args = (app, config, context, task_group, state, ssl, client, server, send)
        self.protocol: H11Protocol | H2Protocol
        if alpn_protocol == "h2":
            self.protocol = H2Protocol(*args)
        else:
            self.protocol = FastH11Protocol(*args, probes=probes)
