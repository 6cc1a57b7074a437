"""Image sources end to end: data URIs, http(s) through a real loopback server, file:// URLs.

HTTP tests use ``tests.helpers.image_server`` (a real server on 127.0.0.1) and short real
timeouts; nothing sleeps longer than a few tenths of a second.
"""

from __future__ import annotations

import base64
import io
import os
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from PIL import Image

from server.config import ServerConfig
from server.options import config_from_env
from tests.helpers.image_server import RequestLog, Route, serve_images
from tests.helpers.resolver import ScriptedResolver
from vl.errors import MediaError, MediaTimeout
from vl.image_fetcher import ImageFetcher
from vl.image_source import EncodedImage, load_image_bytes
from vl.media_policy import MediaPolicy

PARAM = "messages[0].content[1].image_url"
LOOPBACK = MediaPolicy(allow_private_media_urls=True, fetch_timeout=2.0)


def png_bytes(size: tuple[int, int] = (5, 3), color: tuple[int, int, int] = (200, 10, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


PNG = png_bytes()


async def load(url: str, policy: MediaPolicy = LOOPBACK) -> EncodedImage:
    async with ImageFetcher(policy) as fetcher:
        return await load_image_bytes(url, param=PARAM, fetcher=fetcher, policy=policy)


async def expect_media_error(url: str, policy: MediaPolicy = LOOPBACK) -> MediaError:
    with pytest.raises(MediaError) as caught:
        await load(url, policy)
    assert caught.value.param == PARAM
    return caught.value


# --- policy -------------------------------------------------------------------------------


def test_server_config_options_fill_the_media_policy() -> None:
    """Every media option (flag or variable name) lands in ``ServerConfig.media``."""
    config = config_from_env(
        {},
        allowed_local_media_path="/srv/images",
        allowed_media_domains=("Images.Example.",),
        allow_private_media_urls=True,
        max_images_per_request=3,
        max_image_bytes=1234,
        max_image_pixels=5678,
        image_fetch_timeout=1.5,
        image_fetch_concurrency=7,
        max_image_redirects=0,
    )
    assert config.media == MediaPolicy(
        allowed_local_media_path="/srv/images",
        allowed_media_domains=("images.example",),
        allow_private_media_urls=True,
        max_image_bytes=1234,
        max_image_pixels=5678,
        max_images_per_request=3,
        fetch_timeout=1.5,
        fetch_concurrency=7,
        max_redirects=0,
    )
    assert ServerConfig().media == MediaPolicy()


@pytest.mark.parametrize(
    "bad",
    [
        {"max_image_bytes": 0},
        {"fetch_concurrency": -1},
        {"max_redirects": -1},
        {"fetch_timeout": 0},
        {"fetch_timeout": float("inf")},
        {"allowed_local_media_path": "relative/dir"},
        {"allowed_media_domains": "localhost"},
    ],
)
def test_policy_rejects_unenforceable_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        MediaPolicy(**bad)


# --- data: URIs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "media_type"),
    [
        ("data:image/png;base64,", "image/png"),
        ("DATA:Image/PNG;BASE64,", "image/png"),
        ("data:image/jpeg;name=cat.jpg;base64,", "image/jpeg"),
        ("data:application/octet-stream;base64,", "application/octet-stream"),
        ("data:;base64,", None),
        ("data:base64,", None),
    ],
)
async def test_data_uri_payload_is_kept_base64(prefix: str, media_type: str | None) -> None:
    encoded = base64.b64encode(PNG)
    image = await load(prefix + encoded.decode())
    assert image == EncodedImage(payload=encoded, base64_encoded=True, source="data", media_type=media_type)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64", "invalid_image_url"),  # no comma
        ("data:image/png,iVBORw0KGgo=", "invalid_image_url"),  # not base64
        ("data:text/html;base64,PGgxPg==", "invalid_image_url"),
        ("data:image/png;base64,", "invalid_image"),
        ("data:image/png;base64,iVBOR\u00e9w0KGgo=", "invalid_base64"),
    ],
)
async def test_bad_data_uris_are_refused(url: str, code: str) -> None:
    error = await expect_media_error(url)
    assert error.code == code


async def test_data_uri_over_the_byte_cap_is_refused_without_decoding() -> None:
    policy = MediaPolicy(max_image_bytes=30)
    at_cap = base64.b64encode(b"x" * 30).decode()
    assert (await load("data:;base64," + at_cap, policy)).payload == at_cap.encode()
    error = await expect_media_error("data:;base64," + base64.b64encode(b"x" * 33).decode(), policy)
    assert error.code == "image_too_large"


# --- schemes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://127.0.0.1/cat.png", "unsupported_image_url_scheme"),
        ("javascript:alert(1)", "unsupported_image_url_scheme"),
        ("gopher://127.0.0.1:70/_GET%20/", "unsupported_image_url_scheme"),
        ("blob:https://example.com/uuid", "unsupported_image_url_scheme"),
        ("cat.png", "invalid_image_url"),
        ("", "invalid_image_url"),
        ("//example.com/cat.png", "invalid_image_url"),
    ],
)
async def test_other_schemes_are_refused(url: str, code: str) -> None:
    error = await expect_media_error(url)
    assert error.code == code
    if code == "unsupported_image_url_scheme":
        assert "unsupported image URL scheme" in error.message


# --- http(s) --------------------------------------------------------------------------------


async def test_http_fetch_returns_exact_bytes() -> None:
    log = RequestLog()
    async with serve_images({"/cat.png": Route(body=PNG)}, log=log) as base:
        async with ImageFetcher(LOOPBACK) as fetcher:
            image = await load_image_bytes(base + "/cat.png", param=PARAM, fetcher=fetcher, policy=LOOPBACK)
            stats = fetcher.statistics()
    assert image == EncodedImage(payload=PNG, base64_encoded=False, source="http")
    assert (stats.fetched, stats.bytes_fetched, stats.failures, stats.in_flight) == (1, len(PNG), 0, 0)
    assert log.requests[0].headers["accept-encoding"] == "identity"


async def test_redirect_chain_within_the_limit_is_followed() -> None:
    log = RequestLog()
    routes = {
        "/r1": Route(redirect_to="/r2"),  # relative
        "/r2": Route(redirect_to="{base}/cat.png", status=307),  # absolute
        "/cat.png": Route(body=PNG),
    }
    policy = MediaPolicy(allow_private_media_urls=True, max_redirects=2, fetch_timeout=2.0)
    async with serve_images(routes, log=log) as base:
        image = await load(base + "/r1", policy)
    assert image.payload == PNG
    assert log.paths() == ["/r1", "/r2", "/cat.png"]


async def test_redirect_chain_beyond_the_limit_is_refused() -> None:
    log = RequestLog()
    routes = {"/r1": Route(redirect_to="/r2"), "/r2": Route(redirect_to="/cat.png"), "/cat.png": Route(body=PNG)}
    policy = MediaPolicy(allow_private_media_urls=True, max_redirects=1, fetch_timeout=2.0)
    async with serve_images(routes, log=log) as base:
        error = await expect_media_error(base + "/r1", policy)
    assert error.code == "media_too_many_redirects"
    assert log.paths() == ["/r1", "/r2"]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/"])
async def test_redirect_to_another_scheme_is_refused(location: str) -> None:
    async with serve_images({"/r": Route(redirect_to=location)}) as base:
        error = await expect_media_error(base + "/r")
    assert error.code == "unsupported_image_url_scheme"
    assert "after a redirect" in error.message


async def test_redirect_from_allowed_localhost_to_loopback_address_is_refused() -> None:
    """``localhost`` is allow-listed, so the first hop goes through; its redirect to the
    loopback address itself is checked on its own and refused before any request is sent."""
    log = RequestLog()
    policy = MediaPolicy(allowed_media_domains=("localhost",), fetch_timeout=2.0)
    routes = {"/r": Route(redirect_to="http://127.0.0.1:{port}/cat.png"), "/cat.png": Route(body=PNG)}
    async with serve_images(routes, log=log) as base:
        port = base.rsplit(":", 1)[1]
        assert (await load(f"http://localhost:{port}/cat.png", policy)).payload == PNG
        error = await expect_media_error(f"http://localhost:{port}/r", policy)
    assert error.code == "media_url_forbidden"
    assert log.paths() == ["/cat.png", "/r"]


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "[::ffff:127.0.0.1]", "localhost"])
async def test_loopback_is_refused_by_default(host: str) -> None:
    log = RequestLog()
    async with serve_images({"/cat.png": Route(body=PNG)}, log=log) as base:
        port = base.rsplit(":", 1)[1]
        error = await expect_media_error(f"http://{host}:{port}/cat.png", MediaPolicy(fetch_timeout=2.0))
    assert error.code == "media_url_forbidden"
    assert log.requests == []


async def test_dns_rebinding_is_refused_before_the_request_is_sent() -> None:
    """The name passes the pre-connect check (it resolves to a public address), then resolves
    to loopback when the connection is opened. The connected-peer check refuses it before a
    single byte of the request reaches the server."""
    log = RequestLog()
    async with serve_images({"/cat.png": Route(body=PNG)}, log=log) as base:
        port = base.rsplit(":", 1)[1]
        resolver = ScriptedResolver({"images.example": [["93.184.216.34"], ["127.0.0.1"]]})
        trio.socket.set_custom_hostname_resolver(resolver)
        async with ImageFetcher(MediaPolicy(fetch_timeout=2.0)) as fetcher:
            with pytest.raises(MediaError) as caught:
                await fetcher.fetch(f"http://images.example:{port}/cat.png", param=PARAM)
            assert fetcher.statistics().failures == 1
    assert caught.value.code == "media_url_forbidden"
    assert resolver.lookups["images.example"] == 2
    assert log.requests == []


async def test_error_status_is_named() -> None:
    async with serve_images({"/gone.png": Route(body=b"gone", status=410)}) as base:
        missing = await expect_media_error(base + "/missing.png")
        gone = await expect_media_error(base + "/gone.png")
    assert missing.code == gone.code == "media_fetch_failed"
    assert "HTTP 404" in missing.message
    assert "HTTP 410" in gone.message


async def test_connection_refused_is_a_media_error() -> None:
    async with serve_images({}) as base:
        port = int(base.rsplit(":", 1)[1])
    error = await expect_media_error(f"http://127.0.0.1:{port}/cat.png")  # server gone: port closed
    assert error.code == "media_fetch_failed"


async def test_hanging_server_times_out_and_the_connection_is_closed() -> None:
    log = RequestLog()
    policy = MediaPolicy(allow_private_media_urls=True, fetch_timeout=0.3)
    async with serve_images({"/hang": Route(hang=True)}, log=log) as base:
        async with ImageFetcher(policy) as fetcher:
            started = trio.current_time()
            with pytest.raises(MediaTimeout) as caught:
                await fetcher.fetch(base + "/hang", param=PARAM)
            elapsed = trio.current_time() - started
            with trio.fail_after(2):
                await log.wait_for_disconnect("/hang")
            stats = fetcher.statistics()
    assert caught.value.code == "media_fetch_timeout"
    assert caught.value.param == PARAM
    assert 0.25 <= elapsed < 1.0
    assert (stats.failures, stats.in_flight, stats.limiter_borrowed) == (1, 0, 0)


async def test_slow_drip_body_hits_the_overall_deadline() -> None:
    """Every read succeeds quickly, so only the whole-fetch deadline can stop this one."""
    policy = MediaPolicy(allow_private_media_urls=True, fetch_timeout=0.3)
    async with serve_images({"/drip": Route(endless_chunk=b"x" * 16, chunk_interval=0.02)}) as base:
        with pytest.raises(MediaTimeout) as caught:
            await load(base + "/drip", policy)
    assert caught.value.code == "media_fetch_timeout"


# httpx 0.28 iterates bodies through nested async generators that stay suspended when the
# reader stops early; the response and its connection are closed, but trio's GC hook warns
# (ResourceWarning, silent by default) when it finalizes them (encode/httpx#3686).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_streamed_body_is_cut_off_at_the_byte_cap() -> None:
    log = RequestLog()
    policy = MediaPolicy(allow_private_media_urls=True, max_image_bytes=200_000, fetch_timeout=2.0)
    async with serve_images({"/huge": Route(endless_chunk=b"\0" * 65536)}, log=log) as base:
        error = await expect_media_error(base + "/huge", policy)
        with trio.fail_after(2):
            await log.wait_for_disconnect("/huge")
    assert error.code == "image_too_large"


async def test_declared_length_over_the_cap_is_refused_before_reading() -> None:
    policy = MediaPolicy(allow_private_media_urls=True, max_image_bytes=1000, fetch_timeout=2.0)
    async with serve_images({"/liar": Route(body=b"tiny", declared_length=10**12)}) as base:
        error = await expect_media_error(base + "/liar", policy)
    assert error.code == "image_too_large"


@pytest.mark.parametrize(("size", "accepted"), [(1000, True), (1001, False)])
async def test_byte_cap_boundary(size: int, accepted: bool) -> None:
    policy = MediaPolicy(allow_private_media_urls=True, max_image_bytes=1000, fetch_timeout=2.0)
    body = os.urandom(size)
    async with serve_images({"/img": Route(body=body)}) as base:
        if accepted:
            assert (await load(base + "/img", policy)).payload == body
        else:
            assert (await expect_media_error(base + "/img", policy)).code == "image_too_large"


async def test_compressed_responses_are_refused() -> None:
    route = Route(body=b"\x1f\x8b" + b"\0" * 20, headers=(("Content-Encoding", "gzip"),))
    async with serve_images({"/gz": route}) as base:
        error = await expect_media_error(base + "/gz")
    assert error.code == "media_fetch_failed"
    assert "gzip" in error.message


async def test_cookies_never_carry_over_between_fetches() -> None:
    log = RequestLog()
    routes = {"/set": Route(body=PNG, headers=(("Set-Cookie", "session=secret; Path=/"),)), "/cat.png": Route(body=PNG)}
    async with serve_images(routes, log=log) as base:
        async with ImageFetcher(LOOPBACK) as fetcher:
            await fetcher.fetch(base + "/set", param=PARAM)
            await fetcher.fetch(base + "/cat.png", param=PARAM)
    assert log.paths() == ["/set", "/cat.png"]
    assert "cookie" not in log.requests[1].headers


async def test_concurrent_fetches_are_bounded_by_the_limiter() -> None:
    log = RequestLog()
    policy = MediaPolicy(allow_private_media_urls=True, fetch_concurrency=2, fetch_timeout=2.0)
    results: dict[int, bytes] = {}
    async with serve_images({"/slow": Route(body=PNG, delay=0.1)}, log=log) as base:
        async with ImageFetcher(policy) as fetcher:

            async def fetch_one(i: int) -> None:
                results[i] = await fetcher.fetch(base + "/slow", param=PARAM)

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(fetch_one, i)
            stats = fetcher.statistics()
    assert results == {i: PNG for i in range(5)}
    assert log.max_active == 2
    assert (stats.fetched, stats.limiter_borrowed, stats.limiter_total) == (5, 0, 2)


async def test_waiting_for_a_slot_counts_toward_the_deadline() -> None:
    """With one slot, the second fetch waits for the first (which times out at 0.3 s) and must
    still give up at its own 0.3 s mark, not 0.3 s after it finally got the slot."""
    policy = MediaPolicy(allow_private_media_urls=True, fetch_concurrency=1, fetch_timeout=0.3)
    durations: list[float] = []
    async with serve_images({"/hang": Route(hang=True)}) as base:
        async with ImageFetcher(policy) as fetcher:

            async def fetch_one() -> None:
                started = trio.current_time()
                with pytest.raises(MediaTimeout) as caught:
                    await fetcher.fetch(base + "/hang", param=PARAM)
                durations.append(trio.current_time() - started)
                assert caught.value.code == "media_fetch_timeout"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_one)
                nursery.start_soon(fetch_one)
            stats = fetcher.statistics()
    assert len(durations) == 2
    assert all(0.25 <= duration < 0.5 for duration in durations), durations
    assert (stats.failures, stats.in_flight, stats.waiting, stats.limiter_borrowed) == (2, 0, 0, 0)


@pytest.mark.parametrize("route", [Route(hang=True), Route(body=PNG[:10], hang_after_body=True)], ids=["head", "body"])
async def test_cancelled_fetch_leaves_the_fetcher_usable(route: Route) -> None:
    """Invariant: a fetch cancelled at any point (waiting for the response head, or halfway
    through the body) closes its response and connection, gives its limiter slot back, and
    leaves the fetcher's counters and pool consistent: ``in_flight == 0``, the limiter is full,
    nothing counts as fetched or failed, and the next fetch works."""
    log = RequestLog()
    policy = MediaPolicy(allow_private_media_urls=True, fetch_concurrency=3, fetch_timeout=5.0)
    async with serve_images({"/stuck": route, "/cat.png": Route(body=PNG)}, log=log) as base:
        async with ImageFetcher(policy) as fetcher:
            assert await fetcher.fetch(base + "/cat.png", param=PARAM) == PNG  # a pooled connection exists
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(fetcher.fetch, base + "/stuck", param=PARAM))
                with trio.fail_after(2):
                    await log.wait_for_request("/stuck")
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the client is waiting for bytes
                busy = fetcher.statistics()
                nursery.cancel_scope.cancel()
            idle = fetcher.statistics()
            with trio.fail_after(2):
                await log.wait_for_disconnect("/stuck")
            assert await fetcher.fetch(base + "/cat.png", param=PARAM) == PNG
            after = fetcher.statistics()
    assert (busy.in_flight, busy.limiter_borrowed) == (1, 1)
    assert (idle.in_flight, idle.waiting, idle.limiter_borrowed, idle.limiter_total) == (0, 0, 0, 3)
    assert (idle.fetched, idle.failures) == (1, 0)
    assert (after.fetched, after.bytes_fetched, after.failures, after.limiter_borrowed) == (2, 2 * len(PNG), 0, 0)


async def test_cancelled_waiter_releases_no_slot_it_did_not_hold() -> None:
    """A fetch cancelled while queued for a slot leaves the holder's slot alone."""
    log = RequestLog()
    policy = MediaPolicy(allow_private_media_urls=True, fetch_concurrency=1, fetch_timeout=5.0)
    async with serve_images({"/stuck": Route(hang=True), "/cat.png": Route(body=PNG)}, log=log) as base:
        async with ImageFetcher(policy) as fetcher:
            async with trio.open_nursery() as holder:
                holder.start_soon(partial(fetcher.fetch, base + "/stuck", param=PARAM))
                with trio.fail_after(2):
                    await log.wait_for_request("/stuck")
                async with trio.open_nursery() as waiter:
                    waiter.start_soon(partial(fetcher.fetch, base + "/cat.png", param=PARAM))
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                    queued = fetcher.statistics()
                    waiter.cancel_scope.cancel()
                after_waiter = fetcher.statistics()
                holder.cancel_scope.cancel()
            assert await fetcher.fetch(base + "/cat.png", param=PARAM) == PNG
    assert (queued.in_flight, queued.waiting, queued.limiter_borrowed) == (2, 1, 1)
    assert (after_waiter.in_flight, after_waiter.waiting, after_waiter.limiter_borrowed) == (1, 0, 1)
    assert log.paths() == ["/stuck", "/cat.png"]


async def test_fetcher_must_be_open_and_is_entered_once() -> None:
    fetcher = ImageFetcher(LOOPBACK)
    with pytest.raises(RuntimeError):
        await fetcher.fetch("http://127.0.0.1:1/cat.png", param=PARAM)
    async with fetcher:
        pass
    with pytest.raises(RuntimeError):
        await fetcher.fetch("http://127.0.0.1:1/cat.png", param=PARAM)
    with pytest.raises(RuntimeError):
        async with fetcher:
            pass


# --- file:// --------------------------------------------------------------------------------


@pytest.fixture
def media_dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    (allowed / "with space.png").write_bytes(PNG)
    (allowed / "sub").mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "alias.png").symlink_to(allowed / "cat.png")
    return allowed, outside


def file_policy(allowed: Path, **kwargs: object) -> MediaPolicy:
    return MediaPolicy(allowed_local_media_path=str(allowed), **kwargs)


@pytest.mark.parametrize("name", ["cat.png", "with%20space.png", "alias.png", "sub/../cat.png"])
async def test_file_inside_the_allowed_directory_is_read(media_dirs: tuple[Path, Path], name: str) -> None:
    allowed, _ = media_dirs
    image = await load(f"file://{allowed}/{name}", file_policy(allowed))
    assert image == EncodedImage(payload=PNG, base64_encoded=False, source="file")
    assert (await load(f"file://localhost{allowed}/cat.png", file_policy(allowed))).payload == PNG


@pytest.mark.parametrize("name", ["../outside/secret.png", "%2e%2e/outside/secret.png", "escape.png", ".."])
async def test_file_outside_the_allowed_directory_is_refused(media_dirs: tuple[Path, Path], name: str) -> None:
    allowed, _ = media_dirs
    error = await expect_media_error(f"file://{allowed}/{name}", file_policy(allowed))
    assert error.code == "media_url_forbidden"
    assert "secret" not in error.message


async def test_absolute_file_elsewhere_is_refused(media_dirs: tuple[Path, Path]) -> None:
    allowed, outside = media_dirs
    error = await expect_media_error(f"file://{outside}/secret.png", file_policy(allowed))
    assert error.code == "media_url_forbidden"


async def test_file_urls_are_refused_when_not_configured(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    error = await expect_media_error(f"file://{allowed}/cat.png", MediaPolicy())
    assert error.code == "media_url_forbidden"
    assert "not enabled" in error.message


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("missing.png", "image_not_found"),
        ("sub", "invalid_image_url"),
        ("", "invalid_image_url"),
        ("cat.png?x=1", "invalid_image_url"),
    ],
)
async def test_unreadable_local_files(media_dirs: tuple[Path, Path], name: str, code: str) -> None:
    allowed, _ = media_dirs
    error = await expect_media_error(f"file://{allowed}/{name}", file_policy(allowed))
    assert error.code == code


async def test_file_url_naming_a_host_is_refused(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    error = await expect_media_error(f"file://fileserver{allowed}/cat.png", file_policy(allowed))
    assert error.code == "invalid_image_url"


async def test_local_file_over_the_byte_cap_is_refused(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    error = await expect_media_error(f"file://{allowed}/cat.png", file_policy(allowed, max_image_bytes=len(PNG) - 1))
    assert error.code == "image_too_large"
    image = await load(f"file://{allowed}/cat.png", file_policy(allowed, max_image_bytes=len(PNG)))
    assert image.payload == PNG
