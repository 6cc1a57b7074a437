"""SSRF rules: which addresses an image fetch may reach, before connecting and once connected."""

from __future__ import annotations

import ipaddress

import pytest
import trio

from tests.helpers.resolver import ScriptedResolver
from vl.address_guard import check_connected_stream, check_host, check_peer_address, forbidden_reason
from vl.errors import MediaError
from vl.media_policy import MediaPolicy

STRICT = MediaPolicy()
PARAM = "messages[0].content[1].image_url"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoint
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "private"),  # reserved 240/4; Python files it under is_private too
        ("255.255.255.255", "private"),
        ("100.64.0.1", "shared"),
        ("0.1.2.3", "private"),
        ("198.18.0.1", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),
        ("::ffff:127.0.0.1", "loopback (IPv4 in IPv6)"),
        ("::ffff:10.0.0.1", "private (IPv4 in IPv6)"),
        ("::ffff:169.254.169.254", "link-local (IPv4 in IPv6)"),
        ("64:ff9b::7f00:1", "loopback (IPv4 in IPv6)"),
        ("2002:7f00:1::1", "loopback (IPv4 tunnelled in IPv6)"),
        ("2002:a00:1::1", "private (IPv4 tunnelled in IPv6)"),
        ("::127.0.0.1", "reserved"),  # deprecated IPv4-compatible form
    ],
)
def test_non_public_addresses_are_forbidden(address: str, reason: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "93.184.216.34",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "10.0.0.7", "169.254.169.254", "::ffff:127.0.0.1"])
async def test_check_host_refuses_private_literals(host: str) -> None:
    with pytest.raises(MediaError) as caught:
        await check_host(host, 80, STRICT, param=PARAM)
    assert caught.value.code == "media_url_forbidden"
    assert caught.value.param == PARAM
    assert caught.value.status == 400


async def test_check_host_accepts_public_literal() -> None:
    await check_host("8.8.8.8", 443, STRICT, param=PARAM)


async def test_allow_private_flag_lets_everything_through() -> None:
    policy = MediaPolicy(allow_private_media_urls=True)
    for host in ("127.0.0.1", "10.0.0.1", "localhost", "unresolvable.invalid"):
        await check_host(host, 80, policy, param=PARAM)


async def test_allowed_domain_is_an_exact_host_match() -> None:
    trio.socket.set_custom_hostname_resolver(ScriptedResolver({"sub.localhost": [["127.0.0.1"]]}))
    policy = MediaPolicy(allowed_media_domains=("LocalHost.",))
    await check_host("localhost", 80, policy, param=PARAM)
    await check_host("LOCALHOST", 80, policy, param=PARAM)
    with pytest.raises(MediaError) as caught:
        await check_host("sub.localhost", 80, policy, param=PARAM)
    assert caught.value.code == "media_url_forbidden"
    with pytest.raises(MediaError):
        await check_host("127.0.0.1", 80, policy, param=PARAM)  # the address behind it is not listed


async def test_name_resolving_to_private_address_is_refused_without_leaking_it() -> None:
    trio.socket.set_custom_hostname_resolver(ScriptedResolver({"intranet.example": [["10.20.30.40"]]}))
    with pytest.raises(MediaError) as caught:
        await check_host("intranet.example", 80, STRICT, param=PARAM)
    assert caught.value.code == "media_url_forbidden"
    assert "10.20.30.40" not in caught.value.message
    assert "intranet.example" in caught.value.message


async def test_any_private_answer_among_public_ones_is_refused() -> None:
    trio.socket.set_custom_hostname_resolver(
        ScriptedResolver({"mixed.example": [["93.184.216.34", "2606:4700:4700::1111", "::1"]]})
    )
    with pytest.raises(MediaError) as caught:
        await check_host("mixed.example", 80, STRICT, param=PARAM)
    assert caught.value.code == "media_url_forbidden"


async def test_public_name_is_allowed() -> None:
    resolver = ScriptedResolver({"images.example": [["93.184.216.34", "2606:4700:4700::1111"]]})
    trio.socket.set_custom_hostname_resolver(resolver)
    await check_host("images.example", 443, STRICT, param=PARAM)
    assert resolver.lookups == {"images.example": 1}


async def test_unresolvable_name_is_a_media_error() -> None:
    trio.socket.set_custom_hostname_resolver(ScriptedResolver({}))
    with pytest.raises(MediaError) as caught:
        await check_host("nowhere.example", 80, STRICT, param=PARAM)
    assert caught.value.code == "media_url_unresolvable"
    assert caught.value.param == PARAM


async def test_empty_host_is_invalid() -> None:
    with pytest.raises(MediaError) as caught:
        await check_host("", 80, STRICT, param=PARAM)
    assert caught.value.code == "invalid_image_url"


@pytest.mark.parametrize(
    "server_addr",
    [("127.0.0.1", 8080), ("::1", 8080, 0, 0), ("fe80::1%lo", 80, 0, 1), ("::ffff:10.0.0.1", 80, 0, 0)],
)
def test_peer_check_refuses_private_peers(server_addr: tuple) -> None:
    with pytest.raises(MediaError) as caught:
        check_peer_address(server_addr, "images.example", STRICT, param=PARAM)
    assert caught.value.code == "media_url_forbidden"


@pytest.mark.parametrize("server_addr", [None, (), "127.0.0.1", ("not-an-ip", 80), (b"\x7f\x00\x00\x01", 80)])
def test_peer_check_fails_closed_on_unknown_peers(server_addr: object) -> None:
    with pytest.raises(MediaError) as caught:
        check_peer_address(server_addr, "images.example", STRICT, param=PARAM)
    assert caught.value.code == "media_url_forbidden"


def test_peer_check_passes_public_and_exempt_peers() -> None:
    check_peer_address(("93.184.216.34", 443), "images.example", STRICT, param=PARAM)
    check_peer_address(("2606:4700:4700::1111", 443, 0, 0), "images.example", STRICT, param=PARAM)
    allow_listed = MediaPolicy(allowed_media_domains=("localhost",))
    check_peer_address(("127.0.0.1", 80), "localhost", allow_listed, param=PARAM)
    check_peer_address(None, "localhost", allow_listed, param=PARAM)


class _FakeStream:
    def __init__(self, server_addr: object) -> None:
        self.server_addr = server_addr
        self.asked: list[str] = []

    def get_extra_info(self, info: str) -> object:
        self.asked.append(info)
        return self.server_addr if info == "server_addr" else None


def test_connected_stream_check_reads_server_addr() -> None:
    private = _FakeStream(("192.168.0.10", 80))
    with pytest.raises(MediaError):
        check_connected_stream(private, "images.example", STRICT, param=PARAM)
    assert private.asked == ["server_addr"]
    check_connected_stream(_FakeStream(("8.8.8.8", 80)), "images.example", STRICT, param=PARAM)
