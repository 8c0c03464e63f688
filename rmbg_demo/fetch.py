"""Fetching an image from a URL a stranger typed, without letting it reach the server's own network.

The host is resolved once; every address it resolves to must be public (not loopback, private,
link-local, multicast, reserved, unspecified, or an IPv4-in-IPv6 form of those). The connection
goes to the very address that was checked, so a DNS answer that changes between check and use
(rebinding) cannot redirect it. Redirects are followed by hand and each hop is checked again.
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import os
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

DEFAULT_MAX_BYTES = 25 * 1024 * 1024
REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024


class URLFetchError(ValueError):
    """The URL was refused or did not give an image; the message says why."""


def allow_private_default() -> bool:
    return os.environ.get("RMBG_ALLOW_PRIVATE_URLS", "").strip().lower() in {"1", "true", "yes", "on"}


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside a mapped, compatible, 6to4, Teredo or NAT64 IPv6 address."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:  # ::a.b.c.d, the deprecated "compatible" form
        return ipaddress.IPv4Address(packed[12:])
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(packed[12:])
    return None


def address_class(ip: str) -> str | None:
    """None for a public address, else what kind of non-public address it is."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            kind = address_class(str(inner))
            return f"{kind} (inside the IPv6 address {address})" if kind else None
    # Most specific first: Python also counts link-local and reserved ranges as "private".
    for kind in ("loopback", "unspecified", "link_local", "multicast", "reserved", "site_local", "private"):
        if getattr(address, f"is_{kind}", False):
            return f"a {kind.replace('_', '-')} address"
    if not address.is_global:
        return "a non-global address"
    return None


def is_public_address(ip: str) -> bool:
    return address_class(ip) is None


def _literal_ipv4(host: str) -> str | None:
    """Normalise legacy numeric spellings (2130706433, 0x7f000001, 0177.0.0.1, 127.1) to dotted form."""
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def _check_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an acceptable URL, or URLFetchError."""
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise URLFetchError("the URL contains spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise URLFetchError(f"only http and https URLs are allowed, not {scheme or 'a URL without a scheme'!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise URLFetchError("URLs with a user name or password are refused")
    if not parts.hostname:
        raise URLFetchError("the URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise URLFetchError("the URL's port is not a number from 1 to 65535") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, parts.hostname, port, path


def resolve_checked(host: str, port: int, allow_private: bool) -> str:
    """The one address to connect to; refused when any address of `host` is not public."""
    literal = _literal_ipv4(host)
    try:
        infos = socket.getaddrinfo(literal or host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise URLFetchError(f"cannot resolve {host}: {exc.strerror}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private:
        for ip in addresses:
            kind = address_class(ip)
            if kind:
                raise URLFetchError(f"refused: {host} resolves to {ip}, {kind} (start the app with "
                                    f"--allow-private-urls to allow private addresses)")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP(S) over a socket we opened to an address we checked; the Host header keeps the name."""

    def __init__(self, host, port, ip, timeout, tls: bool):
        super().__init__(host, port, timeout=timeout)
        self._ip, self._tls = ip, tls

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), timeout=self.timeout)
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def _read_capped(response, max_bytes: int, deadline: float, url: str) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise URLFetchError(f"the response is larger than the {max_bytes / 2**20:.0f} MB limit ({int(length)} bytes)")
    body = io.BytesIO()
    while True:
        if time.monotonic() > deadline:
            raise URLFetchError(f"timed out reading from {url}")
        chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
        if not chunk:
            return body.getvalue()
        body.write(chunk)
        if body.tell() > max_bytes:
            raise URLFetchError(f"the response is larger than the {max_bytes / 2**20:.0f} MB limit")


def _sniff_image(body: bytes, content_type: str | None) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        Image.open(io.BytesIO(body))
    except (UnidentifiedImageError, OSError, ValueError):
        raise URLFetchError(f"the URL did not return an image (got {content_type or 'no content type'}: "
                            f"{body[:40]!r})") from None


def fetch_url(url: str, *, allow_private: bool | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
              connect_timeout: float = 5.0, read_timeout: float = 10.0, max_redirects: int = 3,
              user_agent: str = "rmbg-demo/0.1") -> bytes:
    """The body of `url`, which must be an image, fetched under the rules in this module's docstring."""
    allow_private = allow_private_default() if allow_private is None else allow_private
    deadline = time.monotonic() + connect_timeout + 3 * read_timeout
    for _hop in range(max_redirects + 1):
        scheme, host, port, path = _check_url(url)
        ip = resolve_checked(host, port, allow_private)
        connection = _PinnedHTTPConnection(host, port, ip, connect_timeout, tls=scheme == "https")
        try:
            try:
                connection.connect()
                connection.sock.settimeout(read_timeout)
                connection.request("GET", path, headers={"User-Agent": user_agent, "Accept": "image/*",
                                                         "Connection": "close"})
                response = connection.getresponse()
                if response.status in REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise URLFetchError(f"the server answered {response.status} without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise URLFetchError(f"the server answered {response.status} {response.reason}")
                body = _read_capped(response, max_bytes, deadline, url)
            except TimeoutError:
                raise URLFetchError(f"timed out after {read_timeout:g} s reading from {url}") from None
            except ssl.SSLError as exc:
                raise URLFetchError(f"TLS failed for {host}: {exc.reason or exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                raise URLFetchError(f"could not fetch {url}: {exc}") from None
        finally:
            connection.close()
        _sniff_image(body, response.getheader("Content-Type"))
        return body
    raise URLFetchError(f"too many redirects (more than {max_redirects})")
