"""SSRF rules for image URLs: which hosts and peer addresses an image fetch may reach.

Two checks, both needed:

* ``check_host`` runs before a connection is opened: the host is resolved and every address it
  resolves to must be public.
* ``check_connected_stream`` runs on the socket that was actually opened, before a byte is sent
  on it. The connection resolves the name again, so this is what defeats DNS rebinding (a name
  that resolves to a public address for the first check and to a private one for the connect).

A host listed in ``policy.allowed_media_domains`` (exact match) or a policy with
``allow_private_media_urls`` skips both. Errors never include the resolved addresses: a client
must not learn the layout of the server's network from them.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Protocol

import trio

from vl.errors import invalid_image_url, media_url_forbidden, media_url_unresolvable
from vl.media_policy import MediaPolicy, normalise_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: last 32 bits are IPv4


class NetworkStream(Protocol):
    """What ``check_connected_stream`` needs: httpcore's network streams satisfy it."""

    def get_extra_info(self, info: str) -> Any: ...


def forbidden_reason(address: IPAddress) -> str | None:
    """Why an image fetch may not connect to ``address``, or ``None`` when it is public.

    Refused: unspecified, loopback, link-local, multicast, private, reserved, shared
    (carrier-grade NAT) and any other non-global address. An IPv6 address that is an IPv4
    address in disguise (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``) is judged as
    that IPv4 address; one that tunnels to an IPv4 address (6to4, Teredo) is refused when that
    address is. Pure function of the address.
    """
    if isinstance(address, ipaddress.IPv6Address):
        translated = _translated_ipv4(address)
        if translated is not None:
            reason = forbidden_reason(translated)
            return None if reason is None else f"{reason} (IPv4 in IPv6)"
        for tunnelled in _tunnelled_ipv4(address):
            reason = forbidden_reason(tunnelled)
            if reason is not None:
                return f"{reason} (IPv4 tunnelled in IPv6)"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED_ADDRESS_SPACE:
        return "shared"
    if not address.is_global:
        return "non-global"
    return None


def _translated_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that packets to ``address`` are delivered to, if it is one in disguise."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _tunnelled_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 endpoints that an IPv6 transition address (6to4, Teredo client) reaches."""
    tunnelled: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        tunnelled.append(address.sixtofour)
    if address.teredo is not None:
        tunnelled.append(address.teredo[1])
    return tunnelled


def parse_address(text: str) -> IPAddress | None:
    """``text`` as an IP address (an IPv6 zone suffix ``%eth0`` ignored), or ``None``."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def is_exempt(host: str, policy: MediaPolicy) -> bool:
    """Whether fetches to ``host`` skip the address checks under ``policy``."""
    return policy.allow_private_media_urls or policy.is_allowed_domain(host)


async def check_host(host: str, port: int, policy: MediaPolicy, *, param: str | None = None) -> None:
    """Refuse ``host`` unless it is exempt or every address it resolves to is public.

    Raises ``MediaError`` (code ``media_url_forbidden``) for a forbidden address and
    (code ``media_url_unresolvable``) when the name does not resolve. Resolution uses
    ``trio.socket.getaddrinfo``, so a custom resolver set with
    ``trio.socket.set_custom_hostname_resolver`` is honoured.

    Cancellation: safe at any point; nothing is held. (trio abandons the resolver thread, which
    holds no gate of ours.)
    """
    host = normalise_host(host)
    if not host:
        raise invalid_image_url("image URL has no host", param)
    if is_exempt(host, policy):
        return
    literal = parse_address(host)
    if literal is not None:
        _refuse_if_forbidden(literal, host, param)
        return
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise media_url_unresolvable(host, param) from exc
    addresses = [parse_address(str(info[4][0])) for info in infos]
    if not addresses:
        raise media_url_unresolvable(host, param)
    for address in addresses:
        if address is None:
            raise media_url_forbidden(f"image URL host {host!r} resolved to a non-IP address", param)
        _refuse_if_forbidden(address, host, param)


def check_peer_address(server_addr: Any, host: str, policy: MediaPolicy, *, param: str | None = None) -> None:
    """Refuse a connection to ``host`` whose peer is ``server_addr`` (a ``getpeername()`` tuple).

    A non-exempt host whose peer address is unknown or unparsable is refused too: the check
    fails closed.
    """
    if is_exempt(host, policy):
        return
    peer = server_addr[0] if isinstance(server_addr, tuple) and server_addr else None
    address = parse_address(peer) if isinstance(peer, str) else None
    if address is None:
        raise media_url_forbidden(
            f"image URL host {normalise_host(host)!r}: the connected address could not be checked", param
        )
    _refuse_if_forbidden(address, normalise_host(host), param)


def check_connected_stream(stream: NetworkStream, host: str, policy: MediaPolicy, *, param: str | None = None) -> None:
    """``check_peer_address`` on a connected httpcore stream (``get_extra_info("server_addr")``).

    Works on a fresh stream (the ``connection.connect_tcp.complete`` trace event) and on
    ``response.extensions["network_stream"]``. Does not close the stream.
    """
    check_peer_address(stream.get_extra_info("server_addr"), host, policy, param=param)


def _refuse_if_forbidden(address: IPAddress, host: str, param: str | None) -> None:
    reason = forbidden_reason(address)
    if reason is not None:
        raise media_url_forbidden(f"image URL host {host!r} is not allowed: it resolves to a {reason} address", param)
