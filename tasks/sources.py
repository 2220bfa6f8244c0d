"""Fetching import sources over HTTP(S) without opening a door into the private network.

A URL given by a client is a server-side request forgery risk: it can name the loopback
interface, the cloud metadata service or an internal host. So the host is resolved here,
every address it resolves to is checked, and the connection goes to the checked address
(pinned), so a DNS answer that changes between check and connect cannot redirect it.
Redirects are followed by hand and every hop is checked the same way.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import quote, unquote, urljoin, urlsplit

_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "hebbrix-jobs-import/1"

_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.I)


class SourceError(Exception):
    """A source that cannot be fetched; ``message`` is one sentence for the API client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class FetchResult:
    final_url: str
    content_type: str | None  # media type only, lowercased, e.g. "text/html"
    bytes_read: int
    filename: str | None  # from Content-Disposition, else the last segment of the URL path


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA) form, no brackets
    port: int
    request_path: str


def parse_allowed_hosts(value: str) -> frozenset[str]:
    """Parse a comma-separated ``host[:port]`` list, e.g. ``"a:8080, b"``.

    Entries are lowercased; an IPv6 address is written ``[::1]:8080`` with a port and
    may be bare (``::1``) without one.
    """
    hosts = set()
    for entry in value.split(","):
        entry = entry.strip().lower().rstrip(".")
        if not entry:
            continue
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        hosts.add(entry)
    return frozenset(hosts)


def fetch_to_file(
    url: str,
    dest: BinaryIO,
    *,
    max_bytes: int,
    allowed_hosts: Collection[str] = (),
    allow_private: bool = False,
    timeout: float = 30.0,
    max_redirects: int = 5,
    on_bytes: Callable[[int, int | None], None] | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> FetchResult:
    """Stream the body of ``url`` into ``dest``, refusing private addresses.

    ``timeout`` bounds connecting and each read. ``on_bytes(done, total)`` is called as
    the body arrives (``total`` is the Content-Length, or None). ``tls_context`` replaces
    the default certificate checks, for a private CA. Raises ``SourceError``.
    """
    allowed = parse_allowed_hosts(",".join(allowed_hosts))
    context = tls_context or ssl.create_default_context()
    target = _parse(url)
    redirects = 0
    while True:
        addresses = _resolve(target)
        if not (allow_private or _is_allowed(target, allowed)):
            _check_addresses(target.host, addresses)
        connection, response = _request(target, addresses, timeout, context)
        try:
            location = response.getheader("Location")
            if response.status in _REDIRECTS and location:
                redirects += 1
                if redirects > max_redirects:
                    raise SourceError(
                        "too_many_redirects",
                        f"The source redirected more than {max_redirects} times.",
                    )
                target = _parse(urljoin(target.url, location.strip()))
                continue
            if not 200 <= response.status < 300:
                raise SourceError("http_error", f"The source answered HTTP {response.status}.")
            return _read_body(target, response, dest, max_bytes, on_bytes, timeout)
        finally:
            connection.close()


def _parse(url: str) -> _Target:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise SourceError("invalid_url", "The source URL is not a valid URL.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise SourceError(
            "unsupported_scheme", "The source URL must start with http:// or https://."
        )
    if "@" in parts.netloc:
        raise SourceError("invalid_url", "The source URL must not contain a user name or password.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise SourceError("invalid_url", "The source URL has no host name.")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        host = ""
    if not (_HOST_NAME.fullmatch(host) or (":" in host and _is_ip(host))):
        raise SourceError("invalid_url", "The source URL has an invalid host name.")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # Spaces and non-ASCII characters are escaped the way browsers send them; existing
    # escapes and reserved characters are left alone.
    path = quote(path, safe="!#$%&'()*+,/:;=?@[]~")
    clean_url = f"{scheme}://{parts.netloc}{path}"
    return _Target(clean_url, scheme, host, port or (443 if scheme == "https" else 80), path)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _host_key(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_allowed(target: _Target, allowed: Collection[str]) -> bool:
    return target.host in allowed or _host_key(target.host, target.port) in allowed


def _resolve(target: _Target) -> list[str]:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise SourceError(
            "fetch_failed", f"The source host {target.host} could not be resolved."
        ) from None
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    if not addresses:
        raise SourceError("fetch_failed", f"The source host {target.host} has no address.")
    return addresses


def _check_addresses(host: str, addresses: list[str]) -> None:
    # Every address, not just the first: the connection may fall back to any of them.
    for address in addresses:
        if _is_forbidden(address):
            raise SourceError(
                "forbidden_address",
                f"The source host {host} resolves to a private or reserved address, "
                "which imports may not reach.",
            )


def _is_forbidden(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and _is_forbidden(str(embedded)):
            return True
        if ip.is_site_local:
            return True
    return (
        ip in _METADATA_ADDRESSES
        or ip in _CGNAT
        or ip.is_multicast
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Sends ``Host: <name>`` but connects to an address checked beforehand."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Like the HTTP one; TLS still checks the certificate against the host name."""

    def __init__(
        self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _request(
    target: _Target, addresses: list[str], timeout: float, context: ssl.SSLContext
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    headers = {
        "User-Agent": _USER_AGENT,
        "Accept": "*/*",
        # The body is stored as sent; a compressed transfer would need decoding, with its
        # own bomb risk, for little gain.
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    last_error: SourceError | None = None
    for address in addresses:
        connection: http.client.HTTPConnection
        if target.scheme == "https":
            connection = _PinnedHTTPSConnection(target.host, target.port, address, timeout, context)
        else:
            connection = _PinnedHTTPConnection(target.host, target.port, address, timeout)
        try:
            connection.connect()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            last_error = _connection_error(exc, timeout)
            if isinstance(exc, ssl.SSLError):
                break  # the server answered; another address will not fix its certificate
            continue
        try:
            connection.request("GET", target.request_path, headers=headers)
            return connection, connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise _connection_error(exc, timeout) from None
    assert last_error is not None
    raise last_error


def _connection_error(exc: BaseException, timeout: float) -> SourceError:
    if isinstance(exc, TimeoutError):
        message = f"The source did not answer within {timeout:g} seconds."
    elif isinstance(exc, ssl.SSLCertVerificationError):
        message = f"The source's TLS certificate is not valid ({exc.verify_message})."
    elif isinstance(exc, ssl.SSLError):
        message = "The TLS handshake with the source failed."
    elif isinstance(exc, ConnectionRefusedError):
        message = "The source refused the connection."
    elif isinstance(exc, http.client.IncompleteRead):
        message = "The connection closed before the whole source arrived."
    elif isinstance(exc, http.client.HTTPException):
        message = "The source sent an invalid HTTP response."
    elif isinstance(exc, ConnectionError):
        message = "The connection to the source was lost."
    else:
        message = "The source could not be reached."
    return SourceError("fetch_failed", message)


def _read_body(
    target: _Target,
    response: http.client.HTTPResponse,
    dest: BinaryIO,
    max_bytes: int,
    on_bytes: Callable[[int, int | None], None] | None,
    timeout: float,
) -> FetchResult:
    length = _content_length(response.getheader("Content-Length"))
    if length is not None and length > max_bytes:
        raise SourceError(
            "source_too_large",
            f"The source is {length} bytes, more than the limit of {max_bytes} bytes.",
        )
    done = 0
    while True:
        try:
            # read1 returns what has arrived, so a slow source still reports
            # progress (and lets a cancelled job stop) between pieces.
            chunk = response.read1(_CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            # Only the network is wrapped: a failing dest or on_bytes keeps its own error.
            raise _connection_error(exc, timeout) from None
        if not chunk:
            break
        if done + len(chunk) > max_bytes:
            raise SourceError(
                "source_too_large",
                f"The source is larger than the limit of {max_bytes} bytes.",
            )
        dest.write(chunk)
        done += len(chunk)
        if on_bytes is not None:
            on_bytes(done, length)
    if length is not None and done < length:
        # http.client reports a short body as a normal end when reading in pieces.
        raise _connection_error(http.client.IncompleteRead(b"", length - done), timeout)
    content_type = response.getheader("Content-Type")
    media_type = content_type.split(";", 1)[0].strip().lower() if content_type else ""
    return FetchResult(
        final_url=target.url,
        content_type=media_type or None,
        bytes_read=done,
        filename=_filename(response, target),
    )


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        return None
    return length if length >= 0 else None


def _filename(response: http.client.HTTPResponse, target: _Target) -> str | None:
    # HTTPMessage is an email.message.Message, which decodes RFC 2231 filename*= too.
    name = response.msg.get_filename() if response.getheader("Content-Disposition") else None
    if not name:
        path = urlsplit(target.url).path
        name = unquote(path.rsplit("/", 1)[-1]) if path else None
    if not name:
        return None
    # Only ever a base name: the value is the server's, and may hold a path.
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip().replace("\x00", "")
    return name if name not in ("", ".", "..") else None
