"""fetch_to_file against a real HTTP server on the loopback interface."""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks import sources
from tasks.sources import SourceError, fetch_to_file, parse_allowed_hosts

BODY = b"hello, memories\n" * 1000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.requests.append(
            (self.path, self.headers.get("Host"), self.headers.get("Accept-Encoding"))
        )
        route = self.path.split("?", 1)[0]
        if route == "/data.txt":
            self._send(200, BODY, {"Content-Type": "text/plain; charset=utf-8"})
        elif route == "/attachment":
            self._send(
                200,
                b"%PDF-1.4 not really",
                {
                    "Content-Type": "application/pdf",
                    "Content-Disposition": "attachment; filename*=UTF-8''r%C3%A9port%201.pdf",
                },
            )
        elif route == "/evil-name":
            disposition = 'attachment; filename="../../etc/passwd"'
            self._send(200, b"x", {"Content-Disposition": disposition})
        elif route.startswith("/redirect/"):
            location = self.path[len("/redirect/") :].replace("PORT", str(server.server_port))
            self._send(302, b"", {"Location": location})
        elif route == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif route == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024 * 1024))
            self.end_headers()
            self.wfile.write(b"x" * 1024)
        elif route == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            piece = b"y" * 32768
            for _ in range(64):  # 2 MiB in all, far past the limit the test sets
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif route == "/slow":
            server.release.wait(5)
            self._send(200, b"late", {})
        elif route == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"only a part")
            self.close_connection = True
        else:
            self._send(404, b"not here", {"Content-Type": "text/plain"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None, str | None]] = []
        self.release = threading.Event()


def _serve(server: ThreadingHTTPServer) -> Iterator[None]:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture()
def server() -> Iterator[_Server]:
    srv = _Server()
    serving = _serve(srv)
    next(serving)
    yield srv
    srv.release.set()
    next(serving, None)


def _allowed(server: _Server) -> set[str]:
    return {f"127.0.0.1:{server.server_port}"}


def _url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_port}{path}"


def _fetch(url: str, **kwargs: object) -> tuple[sources.FetchResult, bytes]:
    kwargs.setdefault("max_bytes", 1024 * 1024)
    kwargs.setdefault("timeout", 5.0)
    out = io.BytesIO()
    result = fetch_to_file(url, out, **kwargs)  # type: ignore[arg-type]
    return result, out.getvalue()


def _error(url: str, **kwargs: object) -> SourceError:
    with pytest.raises(SourceError) as info:
        _fetch(url, **kwargs)
    return info.value


@pytest.fixture()
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)


def _resolve_to(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    def fake(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        result = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 6:
                result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return result

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_fetch_from_an_allowed_host(server: _Server) -> None:
    seen: list[tuple[int, int | None]] = []
    result, body = _fetch(
        _url(server, "/data.txt?x=1"),
        allowed_hosts=_allowed(server),
        on_bytes=lambda done, total: seen.append((done, total)),
    )
    assert body == BODY
    assert result.bytes_read == len(BODY)
    assert result.content_type == "text/plain"
    assert result.filename == "data.txt"
    assert result.final_url == _url(server, "/data.txt?x=1")
    assert seen[-1] == (len(BODY), len(BODY))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    path, host, encoding = server.requests[0]
    assert path == "/data.txt?x=1"
    assert host == f"127.0.0.1:{server.server_port}"
    assert encoding == "identity"


def test_filename_from_content_disposition_is_a_base_name(server: _Server) -> None:
    result, _ = _fetch(_url(server, "/attachment"), allowed_hosts=_allowed(server))
    assert result.filename == "réport 1.pdf"
    assert result.content_type == "application/pdf"
    result, _ = _fetch(_url(server, "/evil-name"), allowed_hosts=_allowed(server))
    assert result.filename == "passwd"


def test_bare_host_entry_allows_any_port(server: _Server) -> None:
    _, body = _fetch(_url(server, "/data.txt"), allowed_hosts={"127.0.0.1"})
    assert body == BODY
    error = _error(_url(server, "/data.txt"), allowed_hosts={"127.0.0.1:1"})
    assert error.code == "forbidden_address"


def test_allow_private_reaches_loopback(server: _Server) -> None:
    _, body = _fetch(_url(server, "/data.txt"), allow_private=True)
    assert body == BODY


def test_loopback_is_refused_without_allow_list(server: _Server) -> None:
    error = _error(_url(server, "/data.txt"))
    assert error.code == "forbidden_address"
    assert "private" in error.message
    assert server.requests == []


def test_localhost_name_is_refused(server: _Server) -> None:
    error = _error(f"http://localhost:{server.server_port}/data.txt")
    assert error.code == "forbidden_address"
    assert server.requests == []


@pytest.mark.usefixtures("no_connect")
@pytest.mark.parametrize(
    "address",
    [
        "[::1]",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:10.0.0.1]",
        "[fd00:ec2::254]",
        "[fe80::1]",
        "[64:ff9b::a00:1]",
        "[2002:a00:1::]",
        "2130706433",  # 127.0.0.1 written as one number
    ],
)
def test_private_address_literals_are_refused_before_connecting(address: str) -> None:
    error = _error(f"http://{address}/latest/meta-data/")
    assert error.code == "forbidden_address"


@pytest.mark.usefixtures("no_connect")
@pytest.mark.parametrize(
    "addresses",
    [("10.0.0.5",), ("127.0.0.1",), ("93.184.216.34", "10.0.0.5"), ("2606:4700::1", "::1")],
)
def test_name_resolving_to_any_private_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, addresses: tuple[str, ...]
) -> None:
    _resolve_to(monkeypatch, *addresses)
    error = _error("https://public.example/data.jsonl")
    assert error.code == "forbidden_address"


def test_connection_goes_to_the_checked_address(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once; the request reaches that address with the original Host."""
    calls: list[str] = []
    real = socket.getaddrinfo

    def once(host: str, *args: object, **kwargs: object) -> list[tuple]:
        if host != "127.0.0.1":  # looking up a literal address is no DNS query
            calls.append(host)
        if len(calls) > 1:  # a rebinding resolver would now answer something else
            raise AssertionError("resolved twice")
        return real("127.0.0.1", *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", once)
    url = f"http://files.example:{server.server_port}/data.txt"
    _, body = _fetch(url, allowed_hosts={"files.example"})
    assert body == BODY
    assert calls == ["files.example"]
    assert server.requests[0][1] == f"files.example:{server.server_port}"


def test_redirect_within_allowed_host_is_followed(server: _Server) -> None:
    result, body = _fetch(_url(server, "/redirect//data.txt"), allowed_hosts=_allowed(server))
    assert body == BODY
    assert result.final_url == _url(server, "/data.txt")
    assert [path for path, _, _ in server.requests] == ["/redirect//data.txt", "/data.txt"]


@pytest.mark.parametrize(
    "location",
    [
        "http://localhost:PORT/data.txt",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:PORT/data.txt",
        "file:///etc/passwd",
    ],
)
def test_redirect_to_a_disallowed_target_is_refused(server: _Server, location: str) -> None:
    error = _error(_url(server, f"/redirect/{location}"), allowed_hosts=_allowed(server))
    assert error.code in ("forbidden_address", "unsupported_scheme")
    assert len(server.requests) == 1


def test_too_many_redirects(server: _Server) -> None:
    error = _error(_url(server, "/loop"), allowed_hosts=_allowed(server), max_redirects=3)
    assert error.code == "too_many_redirects"
    assert len(server.requests) == 4


@pytest.mark.usefixtures("no_connect")
@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.txt",
        "gopher://example.com:70/1",
        "data:text/plain,hi",
        "javascript:alert(1)",
        "//example.com/a",
    ],
)
def test_other_schemes_are_refused(url: str) -> None:
    assert _error(url).code == "unsupported_scheme"


@pytest.mark.usefixtures("no_connect")
@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@example.com/a",
        "http://user@example.com/a",
        "http:///no-host",
        "http://example.com:99999/a",
        "http://exa mple.com/",
    ],
)
def test_invalid_urls_are_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _resolve_to(monkeypatch, "93.184.216.34")
    assert _error(url).code in ("invalid_url", "fetch_failed")


def test_declared_length_over_limit_is_refused_before_reading(server: _Server) -> None:
    out = io.BytesIO()
    with pytest.raises(SourceError) as info:
        fetch_to_file(
            _url(server, "/big-declared"),
            out,
            max_bytes=1024 * 1024,
            allowed_hosts=_allowed(server),
            timeout=5,
        )
    assert info.value.code == "source_too_large"
    assert out.getvalue() == b""


def test_chunked_body_over_limit_stops_at_the_limit(server: _Server) -> None:
    out = io.BytesIO()
    with pytest.raises(SourceError) as info:
        fetch_to_file(
            _url(server, "/big-chunked"),
            out,
            max_bytes=100_000,
            allowed_hosts=_allowed(server),
            timeout=5,
        )
    assert info.value.code == "source_too_large"
    assert len(out.getvalue()) <= 100_000


def test_chunked_body_within_limit(server: _Server) -> None:
    seen: list[int | None] = []
    result, body = _fetch(
        _url(server, "/big-chunked"),
        allowed_hosts=_allowed(server),
        max_bytes=4 * 1024 * 1024,
        on_bytes=lambda d, t: seen.append(t),
    )
    assert result.bytes_read == len(body) == 64 * 32768
    assert set(seen) == {None}


def test_http_error_status(server: _Server) -> None:
    error = _error(_url(server, "/missing"), allowed_hosts=_allowed(server))
    assert error.code == "http_error"
    assert error.message == "The source answered HTTP 404."


def test_timeout_is_a_fetch_failure(server: _Server) -> None:
    error = _error(_url(server, "/slow"), allowed_hosts=_allowed(server), timeout=0.3)
    assert error.code == "fetch_failed"
    assert "0.3 seconds" in error.message


def test_truncated_body_is_a_fetch_failure(server: _Server) -> None:
    error = _error(_url(server, "/short"), allowed_hosts=_allowed(server))
    assert error.code == "fetch_failed"


def test_refused_connection_is_a_fetch_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = _error(f"http://127.0.0.1:{port}/", allow_private=True)
    assert error.code == "fetch_failed"


def test_unresolvable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> list[tuple]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    error = _error("https://nowhere.example/")
    assert error.code == "fetch_failed"
    assert "nowhere.example" in error.message


def test_parse_allowed_hosts() -> None:
    assert parse_allowed_hosts("a:8080, B ,,") == frozenset({"a:8080", "b"})
    assert parse_allowed_hosts("") == frozenset()
    assert parse_allowed_hosts("[::1]:8080, [::1]") == frozenset({"[::1]:8080", "::1"})


# --- HTTPS: the pinned connection still verifies the certificate by host name ---------


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem


@pytest.fixture()
def tls_server(tmp_path: Path) -> Iterator[tuple[_Server, bytes]]:
    cert_path, key_path, pem = _certificate(tmp_path, "files.example")
    srv = _Server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    serving = _serve(srv)
    next(serving)
    yield srv, pem
    srv.release.set()
    next(serving, None)


def _resolve_names_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k))


def test_https_verifies_the_original_host_name(
    tls_server: tuple[_Server, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, pem = tls_server
    _resolve_names_to_loopback(monkeypatch)
    trusted = ssl.create_default_context(cadata=pem.decode())
    url = f"https://files.example:{srv.server_port}/data.txt"
    _, body = _fetch(url, allowed_hosts={"files.example"}, tls_context=trusted)
    assert body == BODY
    assert srv.requests[0][1] == f"files.example:{srv.server_port}"

    wrong_name = f"https://other.example:{srv.server_port}/data.txt"
    error = _error(wrong_name, allowed_hosts={"other.example"}, tls_context=trusted)
    assert error.code == "fetch_failed"
    assert "certificate" in error.message


def test_https_refuses_an_untrusted_certificate(
    tls_server: tuple[_Server, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, _ = tls_server
    _resolve_names_to_loopback(monkeypatch)
    error = _error(
        f"https://files.example:{srv.server_port}/data.txt", allowed_hosts={"files.example"}
    )
    assert error.code == "fetch_failed"
    assert "certificate" in error.message
    assert srv.requests == []
