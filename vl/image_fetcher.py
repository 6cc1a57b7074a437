"""Fetching image bytes over http(s): one pooled client, SSRF checks on every hop, hard limits.

``ImageFetcher`` is a component with a lifetime: ``async with ImageFetcher(policy) as fetcher``
opens one ``httpx.AsyncClient`` (a keep-alive connection pool, running on trio through
httpcore) and closes it on exit. Fetches are bounded by a ``trio.CapacityLimiter`` of
``policy.fetch_concurrency``: a network bound, not a CPU gate. No thread is involved; the
event loop only waits on sockets.

Per fetch: redirects are followed by hand up to ``policy.max_redirects``; before each hop the
URL's host is checked (``address_guard.check_host``), and the socket each new connection
opens is checked before a byte is sent on it (httpcore's documented ``trace`` request
extension reports the connected stream), and again on the response. The body is streamed and
abandoned as soon as it exceeds ``policy.max_image_bytes``. One deadline of
``policy.fetch_timeout`` covers waiting for a slot, every hop and the body.
"""

from __future__ import annotations

import http.cookiejar
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import trio

from vl.address_guard import check_connected_stream, check_host
from vl.errors import (
    MediaError,
    image_too_large,
    invalid_image_url,
    media_fetch_failed,
    media_fetch_timeout,
    media_too_many_redirects,
    media_url_forbidden,
    unsupported_image_url_scheme,
)
from vl.gates import BorrowTimes, TimedBorrow
from vl.media_policy import MediaPolicy

_CLOSE_GRACE_SECONDS = 2.0  # how long closing the pool may take once the fetcher is exited
_FETCH_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REQUEST_HEADERS = {
    "User-Agent": "vlserve-image-fetcher",
    "Accept": "image/*",
    # Images are compressed already; a transfer encoding would let a small body inflate past
    # the byte cap between two checks, so bodies are read raw and any coding is refused.
    "Accept-Encoding": "identity",
}

TraceHook = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class FetcherStatistics:
    """A snapshot of an ``ImageFetcher``.

    ``in_flight``: fetches started and not finished (waiting for a slot or running);
    ``waiting``: those still waiting for a slot; ``limiter_borrowed`` / ``limiter_total``: slots
    in use / configured; ``fetched`` / ``bytes_fetched``: successful fetches and their body
    bytes; ``failures``: fetches that raised ``MediaError`` (timeouts included). A cancelled
    fetch counts in none of the totals.
    """

    in_flight: int
    waiting: int
    limiter_borrowed: int
    limiter_total: int
    fetched: int
    bytes_fetched: int
    failures: int


class ImageFetcher:
    """Fetches images for many requests through one pooled HTTP client.

    Use as ``async with ImageFetcher(policy) as fetcher:``; ``fetch`` outside that block raises
    ``RuntimeError``. A fetcher is entered once. Cookies are never stored or sent, proxies from
    the environment are ignored, and only HTTP/1.1 is spoken.
    """

    def __init__(self, policy: MediaPolicy) -> None:
        self._policy = policy
        self._limiter = trio.CapacityLimiter(policy.fetch_concurrency)
        self._client: httpx.AsyncClient | None = None
        self._entered = False
        self._in_flight = 0
        self._fetched = 0
        self._bytes_fetched = 0
        self._failures = 0

    async def __aenter__(self) -> ImageFetcher:
        """Open the connection pool. Raises ``RuntimeError`` if this fetcher was entered before."""
        if self._entered:
            raise RuntimeError("an ImageFetcher can be entered only once")
        self._entered = True
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self._policy.fetch_timeout),
            limits=httpx.Limits(max_connections=self._policy.fetch_concurrency),
            cookies=_refuse_all_cookies(),
            headers=_REQUEST_HEADERS,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the pool and every connection in it.

        Cancellation: closing is shielded for at most a short grace period, so a cancelled
        owner still closes its sockets; fetches still running afterwards fail.
        """
        client, self._client = self._client, None
        if client is not None:
            with trio.move_on_after(_CLOSE_GRACE_SECONDS, shield=True):
                await client.aclose()

    def statistics(self) -> FetcherStatistics:
        """A snapshot of this fetcher's counters and limiter."""
        limiter = self._limiter.statistics()
        return FetcherStatistics(
            in_flight=self._in_flight,
            waiting=limiter.tasks_waiting,
            limiter_borrowed=limiter.borrowed_tokens,
            limiter_total=limiter.total_tokens,
            fetched=self._fetched,
            bytes_fetched=self._bytes_fetched,
            failures=self._failures,
        )

    async def fetch(self, url: str, *, param: str, times: BorrowTimes | None = None) -> bytes:
        """The body of ``url`` (``http`` or ``https``), following redirects within the policy.

        Raises ``MediaTimeout`` when the whole fetch (slot wait, every hop, the body) takes
        longer than ``policy.fetch_timeout``, and ``MediaError`` naming ``param`` for a
        forbidden or unsupported URL, too many redirects, a non-2xx status, a body over
        ``policy.max_image_bytes`` or a transport failure.

        ``times`` (if given) gets when the fetch asked for a slot of the limiter, got it and
        gave it back (``vl.gates.BorrowTimes``).

        Cancellation: safe at any point. The response being read is closed (its connection is
        dropped, not returned to the pool half-read), the limiter slot is released, and the
        pool and this fetcher's counters stay consistent; the next fetch works as usual.
        """
        client = self._client
        if client is None:
            raise RuntimeError("ImageFetcher is not open: use `async with ImageFetcher(policy) as fetcher`")
        self._in_flight += 1
        try:
            body = await self._fetch_within_deadline(client, url, param, times)
        except MediaError:
            self._failures += 1
            raise
        finally:
            self._in_flight -= 1
        self._fetched += 1
        self._bytes_fetched += len(body)
        return body

    async def _fetch_within_deadline(
        self, client: httpx.AsyncClient, url: str, param: str, times: BorrowTimes | None
    ) -> bytes:
        timeout = self._policy.fetch_timeout
        got_slot = False
        with trio.move_on_after(timeout):
            async with self._limiter if times is None else TimedBorrow(self._limiter, times):
                got_slot = True
                return await self._follow_redirects(client, url, param)
        if not got_slot:
            raise media_fetch_timeout(f"no image fetch slot became free within {timeout:g} s (server busy)", param)
        raise media_fetch_timeout(f"fetching the image took longer than {timeout:g} s", param)

    async def _follow_redirects(self, client: httpx.AsyncClient, url: str, param: str) -> bytes:
        target = _parse_fetch_url(url, param)
        for hop in range(self._policy.max_redirects + 1):
            _require_fetchable(target, param, redirected=hop > 0)
            host = target.raw_host.decode("ascii")
            await check_host(host, target.port or _DEFAULT_PORTS[target.scheme], self._policy, param=param)
            with _translate_httpx_errors(param):
                async with self._open(client, target, host, param) as response:
                    if response.is_redirect:
                        target = _redirect_target(response, param)
                        continue
                    return await self._read_body(response, param)
        raise media_too_many_redirects(self._policy.max_redirects, param)

    @asynccontextmanager
    async def _open(
        self, client: httpx.AsyncClient, target: httpx.URL, host: str, param: str
    ) -> AsyncIterator[httpx.Response]:
        """Send one GET; yields the response with headers read. Closes it on exit or cancellation."""
        extensions = {"trace": self._peer_guard(host, param)}
        async with client.stream("GET", target, extensions=extensions) as response:
            network_stream = response.extensions.get("network_stream")
            if network_stream is None:
                raise media_url_forbidden("the image connection could not be checked", param)
            check_connected_stream(network_stream, host, self._policy, param=param)
            yield response

    def _peer_guard(self, host: str, param: str) -> TraceHook:
        """A trace hook refusing a new connection to a forbidden peer before a byte is sent on it."""
        policy = self._policy

        async def trace(event: str, info: dict[str, Any]) -> None:
            if event != "connection.connect_tcp.complete":
                return
            stream = info["return_value"]
            try:
                check_connected_stream(stream, host, policy, param=param)
            except MediaError:
                await stream.aclose()  # httpcore never saw this stream succeed; it is ours to close
                raise

        return trace

    async def _read_body(self, response: httpx.Response, param: str) -> bytes:
        if not response.is_success:
            raise media_fetch_failed(
                f"image URL returned HTTP {response.status_code} {response.reason_phrase}".rstrip(), param
            )
        coding = response.headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise media_fetch_failed(f"image URL used unsupported content encoding {coding!r}", param)
        cap = self._policy.max_image_bytes
        declared = _declared_length(response)
        if declared is not None and declared > cap:
            raise image_too_large(cap, param)
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > cap:
                raise image_too_large(cap, param)
            chunks.append(chunk)
        return b"".join(chunks)


def _parse_fetch_url(url: str, param: str) -> httpx.URL:
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise invalid_image_url("image URL is not a valid URL", param) from exc


def _require_fetchable(target: httpx.URL, param: str, *, redirected: bool) -> None:
    if target.scheme not in _FETCH_SCHEMES:
        raise unsupported_image_url_scheme(target.scheme, param, after_redirect=redirected)
    if not target.raw_host:
        raise invalid_image_url("image URL has no host", param)


def _redirect_target(response: httpx.Response, param: str) -> httpx.URL:
    try:
        return response.url.join(response.headers["location"])
    except httpx.InvalidURL as exc:
        raise invalid_image_url("image URL redirected to an invalid URL", param) from exc


def _declared_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _refuse_all_cookies() -> http.cookiejar.CookieJar:
    """A jar that stores nothing: one client serves every request, so no cookie may carry over."""
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


@contextmanager
def _translate_httpx_errors(param: str) -> Iterator[None]:
    """httpx failures as ``MediaError``; everything else (``MediaError``, ``Cancelled``) untouched."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise media_fetch_timeout("fetching the image timed out", param) from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise invalid_image_url("image URL is not a valid http(s) URL", param) from exc
    except httpx.HTTPError as exc:
        raise media_fetch_failed(f"fetching the image failed ({type(exc).__name__})", param) from exc
