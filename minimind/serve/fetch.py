"""Fetching a client's `image_url` without handing the client the server's network (SSRF).

The host name is resolved here and refused if any of its addresses is not a public one (private,
loopback, link-local such as the cloud metadata service at 169.254.169.254, multicast, reserved,
unspecified, or one of those inside an IPv6 address); the connection then goes to the checked address
(so a second lookup cannot swap it: DNS rebinding), follows no redirect, stops past the byte limit and
at a deadline for the whole fetch. The client learns only that the fetch failed, never the network's
error text.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from minimind.serve.errors import APIError

NAT64 = ipaddress.ip_network("64:ff9b::/96")
_lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-url-lookup")  # getaddrinfo has no timeout of its own


def public_address(address: str) -> bool:
    """Whether anyone on the internet could reach this IP address, and so may the server for a client."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone ("fe80::1%eth0") is not part of the address
    inside = []
    if ip.version == 6:
        inside = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ()),
                  ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None]
    return all(_public(each) for each in [ip, *inside] if each is not None)


def _public(ip) -> bool:
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


address_allowed = public_address  # the one check every fetch passes; a test may widen it to reach a local server


def fetch_image(url: str, max_bytes: int, timeout_s: float, param: str) -> bytes:
    """The body of an http(s) URL on a public address, at most `max_bytes`, within `timeout_s` in all."""
    deadline = time.monotonic() + timeout_s
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.username or parts.password:
        raise APIError(400, "image_url.url must be an http(s) URL with a host (and no user name or password)", param=param,
                       code="invalid_image_url")
    failed = APIError(400, "could not fetch the image", param=param, code="invalid_image_url")
    try:
        addresses = _lookups.submit(socket.getaddrinfo, parts.hostname, port, type=socket.SOCK_STREAM).result(_left(deadline))
    except (OSError, UnicodeError):  # no such name, or the lookup ran past the deadline
        raise failed from None
    if not addresses or not all(address_allowed(sockaddr[0]) for *_, sockaddr in addresses):
        raise APIError(400, "the image URL's host is not a public address; this server fetches only from public ones",
                       param=param, code="invalid_image_url")
    family, _, _, _, sockaddr = addresses[0]
    sock, connection = socket.socket(family, socket.SOCK_STREAM), None
    try:
        sock.settimeout(_left(deadline))
        sock.connect(sockaddr)  # the checked address, not the name
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        connection = http.client.HTTPConnection(parts.hostname, port, timeout=_left(deadline))
        connection.sock = sock
        connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                           headers={"Accept": "image/*", "User-Agent": "minimind-serve"})
        response = connection.getresponse()
        if 300 <= response.status < 400:
            raise APIError(400, "could not fetch the image: the URL redirects, and redirects are not followed", param=param,
                           code="invalid_image_url")
        if response.status != 200:
            raise APIError(400, f"could not fetch the image: HTTP {response.status}", param=param, code="invalid_image_url")
        too_large = APIError(413, f"image larger than {max_bytes} bytes", param=param, code="image_too_large")
        if int(response.getheader("Content-Length") or 0) > max_bytes:
            raise too_large
        data = bytearray()
        while chunk := _read(response, sock, deadline):
            data += chunk
            if len(data) > max_bytes:
                raise too_large
        return bytes(data)
    except APIError:
        raise
    except (OSError, http.client.HTTPException, ValueError):  # refused, reset, TLS, timeout, a broken reply
        raise failed from None
    finally:
        (connection or sock).close()


def _read(response: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(_left(deadline))  # a server that trickles bytes still ends at the deadline
    return response.read1(64 * 1024)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
