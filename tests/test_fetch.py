"""Attacks on the URL fetcher, against a real server on 127.0.0.1 that counts what reaches it."""
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from rmbg_demo.fetch import URLFetchError, address_class, fetch_url, is_public_address, resolve_checked


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = small_png()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits = 0

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if not any(k == "Content-Length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: C901 - one branch per test route
        type(self).hits += 1
        url = urlsplit(self.path)
        port = self.server.server_port
        if url.path == "/img.png":
            self.send(200, PNG, [("Content-Type", "text/plain")])  # the type header is not trusted
        elif url.path == "/html":
            self.send(200, b"<!doctype html><title>not an image</title>", [("Content-Type", "image/png")])
        elif url.path == "/big":
            self.send(200, PNG + b"\0" * 1_000_000)
        elif url.path == "/big-no-length":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(PNG)
                for _ in range(100):
                    self.wfile.write(b"\0" * 10_000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        elif url.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif url.path == "/redirect":
            self.send(302, headers=[("Location", parse_qs(url.query)["to"][0])])
        elif url.path == "/no-location":
            self.send(302)  # a redirect that says nowhere
        elif url.path == "/loop":
            self.send(302, headers=[("Location", "/loop")])
        elif url.path.startswith("/chain/"):
            left = int(url.path.rsplit("/", 1)[1])
            self.send(302, headers=[("Location", f"/chain/{left - 1}" if left > 1 else f"http://127.0.0.1:{port}/img.png")])
        else:
            self.send(404, b"nope")


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the fetcher hanging up on /big and /slow is the point of those tests


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


@pytest.fixture
def port(server):
    Handler.hits = 0
    return server.server_port


LOOPBACK_SPELLINGS = [
    "127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "0.0.0.0", "0",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[0:0:0:0:0:ffff:127.0.0.1]", "[::]",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_this_machine_is_refused_before_any_request(port, host):
    with pytest.raises(URLFetchError, match=r"refused: .* (loopback|unspecified)"):
        fetch_url(f"http://{host}:{port}/img.png", allow_private=False)
    assert Handler.hits == 0


@pytest.mark.parametrize("ip, kind", [
    ("10.0.0.1", "private"), ("192.168.1.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "non-global"), ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"), ("[fc00::1]", "private"), ("[fe80::1]", "link-local"),
    ("[::ffff:10.1.2.3]", "private"), ("[2002:a9fe:a9fe::]", "link-local"), ("[64:ff9b::10.0.0.1]", "private"),
])
def test_private_addresses_are_refused_without_connecting(ip, kind):
    # The check happens before any socket is opened: nothing leaves this machine.
    with pytest.raises(URLFetchError, match=kind):
        fetch_url(f"http://{ip}/x.png", allow_private=False, connect_timeout=0.1)


def test_address_classes():
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700:4700::1111")
    for ip in ("127.0.0.1", "10.1.1.1", "::1", "::ffff:192.168.0.1", "0.0.0.0", "169.254.0.1", "::"):
        assert not is_public_address(ip), ip
    assert "loopback" in address_class("::ffff:127.0.0.1")


@pytest.mark.parametrize("url, message", [
    ("file:///etc/passwd", "only http and https"), ("ftp://example.com/a.png", "only http and https"),
    ("gopher://example.com/", "only http and https"), ("data:image/png;base64,AAAA", "only http and https"),
    ("javascript:alert(1)", "only http and https"), ("http://user:pw@example.com/a.png", "user name or password"),
    ("http://user@example.com/a.png", "user name or password"), ("http:///a.png", "no host"),
    ("http://exa mple.com/", "spaces or control characters"), ("http://example.com:99999/", "port"),
])
def test_bad_urls(url, message):
    with pytest.raises(URLFetchError, match=message):
        fetch_url(url, allow_private=True)


def test_allowed_private_fetch_returns_the_image(port):
    assert fetch_url(f"http://127.0.0.1:{port}/img.png", allow_private=True) == PNG


def test_redirects_are_followed_by_hand_up_to_three(port):
    base = f"http://127.0.0.1:{port}"
    assert fetch_url(f"{base}/chain/3", allow_private=True) == PNG
    assert fetch_url(f"{base}/redirect?to={base}/img.png", allow_private=True) == PNG
    with pytest.raises(URLFetchError, match=r"too many redirects \(more than 3\)"):
        fetch_url(f"{base}/chain/4", allow_private=True)
    with pytest.raises(URLFetchError, match="too many redirects"):
        fetch_url(f"{base}/loop", allow_private=True)


@pytest.mark.parametrize("target, host, refusal", [
    ("http://127.0.0.1:1/", "127.0.0.1", "127.0.0.1, a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "169.254.169.254, a link-local address"),
    ("http://[::1]/", "::1", "::1, a loopback address"),
])
def test_each_redirect_hop_is_checked(port, monkeypatch, target, host, refusal):
    # A public first hop is simulated by letting only the first resolution through; the
    # second hop must be refused by its own check (the exact refusal, not any "refused":
    # an unchecked hop to 127.0.0.1:1 would fail with "Connection refused").
    import rmbg_demo.fetch as fetch

    real = fetch.resolve_checked
    calls = []

    def first_hop_public(host_, port_, allow_private):
        calls.append(host_)
        return real(host_, port_, allow_private=allow_private or len(calls) == 1)  # the fetcher's own flag counts

    monkeypatch.setattr(fetch, "resolve_checked", first_hop_public)
    with pytest.raises(URLFetchError) as error:
        fetch_url(f"http://127.0.0.1:{port}/redirect?to={target}", allow_private=False)
    assert str(error.value) == (f"refused: {host} resolves to {refusal} (start the app with --allow-private-urls "
                                f"to allow private addresses)")
    assert calls == ["127.0.0.1", host]  # both hops were resolved and checked
    assert Handler.hits == 1  # the redirect itself, and nothing after it


def test_a_redirect_without_location_is_an_error(port):
    with pytest.raises(URLFetchError, match=r"^the server answered 302 without a Location$"):
        fetch_url(f"http://127.0.0.1:{port}/no-location", allow_private=True)
    assert Handler.hits == 1


def test_html_is_not_an_image_whatever_its_content_type(port):
    with pytest.raises(URLFetchError, match=r"did not return an image \(got image/png: b'<!doctype html>"):
        fetch_url(f"http://127.0.0.1:{port}/html", allow_private=True)


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
def test_size_cap_is_enforced(port, path):
    with pytest.raises(URLFetchError, match=r"the response is larger than the \d+ MB limit"):
        fetch_url(f"http://127.0.0.1:{port}{path}", allow_private=True, max_bytes=100_000)


def test_a_dribbling_server_times_out(port):
    with pytest.raises(URLFetchError, match="timed out"):
        fetch_url(f"http://127.0.0.1:{port}/slow", allow_private=True, connect_timeout=1, read_timeout=1)


def test_http_errors_are_reported(port):
    with pytest.raises(URLFetchError, match="answered 404"):
        fetch_url(f"http://127.0.0.1:{port}/missing", allow_private=True)


def test_environment_variable_lifts_only_the_address_rule(port, monkeypatch):
    monkeypatch.setenv("RMBG_ALLOW_PRIVATE_URLS", "1")
    assert fetch_url(f"http://127.0.0.1:{port}/img.png") == PNG
    with pytest.raises(URLFetchError, match="only http and https"):
        fetch_url("file:///etc/passwd")
    with pytest.raises(URLFetchError, match="user name"):
        fetch_url(f"http://a:b@127.0.0.1:{port}/img.png")


def test_resolution_picks_the_checked_address():
    assert resolve_checked("0x7f000001", 80, allow_private=True) == "127.0.0.1"
