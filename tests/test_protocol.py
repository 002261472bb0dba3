"""Request validation without Ray or a network: sampling fields, body and text limits, the image format
allow-list and pixel check, and the remote-image fetch guard (refusals from literal addresses; a local
server is refused as loopback, and reached only where a test widens the address check on purpose)."""

import base64
import http.server
import io
import struct
import threading
import zlib

import pytest
from PIL import Image

from minimind.serve import fetch
from minimind.serve.errors import APIError
from minimind.serve.protocol import Limits, check_image, decode_image, parse_chat_body, parse_chat_request, read_json

MODELS = {"minimind": False, "minimind-v": True}


def ask(**extra) -> dict:
    return {"model": "minimind", "messages": [{"role": "user", "content": "你好"}], **extra}


def refused(body, limits=None, models=MODELS) -> APIError:
    with pytest.raises(APIError) as raised:
        parse_chat_request(body, models, limits or Limits())
    assert set(raised.value.body()["error"]) == {"message", "type", "param", "code"}
    return raised.value


def image_bytes(fmt="PNG", size=(8, 8), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def with_garbage_exif(fmt="PNG", pointer=(0xA005, 11, 1, 0x406797B6)) -> bytes:
    """A valid 16x16 image whose EXIF block (~40 bytes) asks for a rotation and holds a broken IFD pointer:
    Pillow decodes the pixels, and applying the orientation raises (struct.error as given, ValueError with
    (0x8769, 6, 2, 0xEFE6F675))."""
    entries = [(0x0112, 3, 1, 6 << 16), pointer]  # orientation 6 (rotate), then the broken pointer
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHII", *entry) for entry in entries) + struct.pack(">I", 0)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, format=fmt, exif=b"MM\x00\x2a\x00\x00\x00\x08" + ifd)
    return buffer.getvalue()


def test_top_k_and_repetition_penalty_parse_as_vllm_takes_them():
    request = parse_chat_request(ask(), MODELS, Limits())
    assert (request.top_k, request.repetition_penalty) == (0, 1.0)
    request = parse_chat_request(
        ask(top_k=40, repetition_penalty=1.3, stream=True, stream_options={"include_usage": True}), MODELS, Limits()
    )
    assert (request.top_k, request.repetition_penalty, request.include_usage) == (40, 1.3, True)
    assert request.sampling()["top_k"] == 40 and request.sampling()["repetition_penalty"] == 1.3
    assert parse_chat_request(ask(top_k=None, repetition_penalty=2), MODELS, Limits()).top_k == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_k", "40"),
        ("top_k", True),
        ("top_k", 2**63),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1),
        ("repetition_penalty", 2.5),
        ("repetition_penalty", float("nan")),
        ("repetition_penalty", "1.1"),
        ("stream_options", "yes"),
        ("stream_options", {"include_usage": "yes"}),
        ("n", 2),
        ("n", -1),
        ("n", 0),
        ("n", "1"),
        ("n", True),
    ],
)
def test_bad_sampling_fields_are_refused(field, value):
    error = refused(ask(**{field: value}))
    assert error.status == 400 and error.param == field


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", True),
        ("top_logprobs", 3),
        ("logit_bias", {"42": 100}),
        ("functions", [{"name": "f"}]),  # OpenAI's old name for tools
        ("response_format", {"type": "json_object"}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("modalities", ["text", "audio"]),
    ],
)
def test_openai_fields_this_server_does_not_implement_are_refused_not_ignored(field, value):
    error = refused(ask(**{field: value}))
    assert error.status == 400 and error.param == field and "not supported" in error.message


def test_the_values_of_unimplemented_fields_that_ask_for_nothing_are_taken():
    defaults = {
        "logprobs": False,
        "top_logprobs": None,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "modalities": ["text"],
    }
    assert parse_chat_request(ask(**defaults), MODELS, Limits()).messages


def test_n_of_one_is_the_one_choice_this_server_returns():
    assert parse_chat_request(ask(n=1), MODELS, Limits()).messages and parse_chat_request(ask(n=None), MODELS, Limits())
    assert "one choice per request" in refused(ask(n=2)).message


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"model": "\xff\xfe"}', "UTF-8"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"model": "a\x00b"}', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_bodies_that_are_not_json_are_400_not_a_crash(raw, fragment):
    with pytest.raises(APIError) as raised:
        read_json(raw)
    assert raised.value.status == 400 and fragment in raised.value.message


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('"\\ud800"', "lone surrogate"),
        ('"a\\u0000b"', "NUL"),
        ('[{"type": "text", "text": "\\udfff"}]', "lone surrogate"),
    ],
)
def test_text_the_tokenizer_cannot_take_is_refused(content, fragment):
    raw = ('{"model": "minimind", "messages": [{"role": "user", "content": %s}]}' % content).encode()
    with pytest.raises(APIError) as raised:
        parse_chat_body(raw, MODELS, Limits())
    assert raised.value.status == 400 and fragment in raised.value.message


def test_text_limits_per_message_in_all_and_in_number():
    limits = Limits(max_message_chars=10, max_total_chars=15, max_messages=3)
    assert parse_chat_request(ask(messages=[{"role": "user", "content": "x" * 10}]), MODELS, limits)
    assert refused(ask(messages=[{"role": "user", "content": "x" * 11}]), limits).status == 413
    parts = [{"type": "text", "text": "x" * 6}] * 2
    assert refused(ask(messages=[{"role": "user", "content": parts}]), limits).code == "message_too_long"
    two = [{"role": "user", "content": "x" * 8}] * 2
    assert refused(ask(messages=two), limits).code == "messages_too_long"
    assert refused(ask(messages=[{"role": "user", "content": "x"}] * 4), limits).code == "too_many_messages"
    assert "'stop'" in refused(ask(stop=["a"] * 50)).message


def test_images_over_the_count_are_refused_before_they_are_decoded():
    good = {"type": "image_url", "image_url": {"url": data_url(image_bytes())}}
    never_decoded = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
    error = refused(
        {"model": "minimind-v", "messages": [{"role": "user", "content": [good, good, never_decoded]}]}, Limits(max_images=2)
    )
    assert error.status == 400 and "at most 2 images" in error.message


@pytest.mark.parametrize("fmt, save", [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("GIF", {})])
def test_png_jpeg_webp_and_gif_are_taken(fmt, save):
    check_image(image_bytes(fmt, **save), 10_000, "p")


def test_an_animated_gif_counts_by_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    check_image(buffer.getvalue(), 100, "p")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'
PSD = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 8, 8, 8, 3) + b"\x00" * 16


@pytest.mark.parametrize(
    "name, data",
    [
        ("BMP", image_bytes("BMP")),
        ("TIFF", image_bytes("TIFF")),
        ("ICO", image_bytes("ICO")),
        ("PPM", image_bytes("PPM")),
        ("EPS", EPS),
        ("SVG", SVG),
        ("PSD", PSD),
        ("text", b"just some text"),
        ("empty", b""),
    ],
)
def test_every_other_format_is_refused_unparsed(name, data, monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("the EPS parser ran"))
    with pytest.raises(APIError) as raised:
        check_image(data, 10_000, "p")
    assert raised.value.status == 400 and "PNG, JPEG, WebP or GIF" in raised.value.message


@pytest.mark.parametrize("width, height", [(30_000, 30_000), (5000, 5000), (101, 100)])
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(width, height, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(APIError) as raised:
        check_image(png_declaring(width, height), 10_000, "p")
    assert raised.value.status == 413 and raised.value.code == "image_too_large"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("pointer", [(0xA005, 11, 1, 0x406797B6), (0x8769, 6, 2, 0xEFE6F675)])
def test_an_image_whose_exif_block_cannot_be_applied_is_400(fmt, pointer):
    """The model replica applies the EXIF orientation: an image it could not use is refused here, not there."""
    with pytest.raises(APIError) as raised:
        check_image(with_garbage_exif(fmt, pointer), 10_000, "p")
    assert (raised.value.status, raised.value.code) == (400, "invalid_image") and "corrupt" in raised.value.message


@pytest.mark.parametrize("width, height", [(1, 20_000), (200_000, 1), (20, 401)])
def test_an_image_far_longer_than_wide_is_refused_from_its_header(width, height, monkeypatch):
    """The CLIP processor scales the short side up to its input size: 1x20000 would become 224x4480000."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(APIError) as raised:
        check_image(png_declaring(width, height), 16_000_000, "p")
    assert raised.value.status == 400 and "at most 20 times its short side" in raised.value.message


def test_an_image_at_the_aspect_limit_is_taken():
    check_image(image_bytes(size=(20, 400)), 10_000, "p")


def test_truncated_images_and_base64_are_400():
    png = image_bytes(size=(64, 64))
    with pytest.raises(APIError, match="corrupt or truncated"):
        check_image(png[: len(png) // 2], 10_000, "p")
    with pytest.raises(APIError, match="not valid base64"):
        decode_image(data_url(png)[:-3], Limits(), "p")
    with pytest.raises(APIError) as raised:
        decode_image(data_url(b"x" * 2000), Limits(max_image_bytes=1000), "p")
    assert raised.value.status == 413


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::",
        "64:ff9b::a00:1",
        "2001:db8::1",
    ],
)
def test_addresses_that_are_not_public_are_not_fetched_from(address):
    assert not fetch.public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are(address):
    assert fetch.public_address(address)


class ImageServer(http.server.BaseHTTPRequestHandler):
    """Local test server: /image.png, /redirect (to /image.png), /big (a chunked body over the limit), /slow."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        ImageServer.requests.append(self.path)
        if self.path == "/image.png":
            body = image_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/big", "/slow"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                self.wfile.flush()
                if self.path == "/slow":
                    threading.Event().wait(0.1)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ImageServer.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


REMOTE = Limits(allow_remote_images=True, max_image_bytes=20_000, remote_image_timeout_s=2)


def test_a_local_server_is_refused_as_loopback_and_never_contacted(image_server):
    port = image_server.rsplit(":", 1)[1]
    for url in (
        f"{image_server}/image.png",
        f"http://localhost:{port}/image.png",
        f"http://2130706433:{port}/image.png",
        f"http://[::1]:{port}/image.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/a.png",
        "https://[::ffff:7f00:1]/a.png",
    ):
        with pytest.raises(APIError) as raised:
            decode_image(url, REMOTE, "p")
        assert raised.value.status == 400 and "not a public address" in raised.value.message, url
    assert ImageServer.requests == []


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("file:///etc/passwd", "data:image"),
        ("ftp://example.com/a.png", "data:image"),
        ("gopher://x/", "data:image"),
        ("http://user:secret@8.8.8.8/a.png", "no user name"),
        ("http://8.8.8.8:99999/a.png", "with a host"),
        ("http:///a.png", "with a host"),
    ],
)
def test_other_schemes_and_malformed_urls_are_refused_offline(url, fragment):
    with pytest.raises(APIError) as raised:
        decode_image(url, REMOTE, "p")
    assert raised.value.status == 400 and fragment in raised.value.message


def test_remote_images_are_off_by_default():
    with pytest.raises(APIError, match="remote image URLs are disabled"):
        decode_image("http://8.8.8.8/a.png", Limits(), "p")


def test_with_the_address_check_widened_a_fetch_is_bounded(image_server, monkeypatch):
    """Only here may loopback be reached: what a fetch does once an address passed the check."""
    monkeypatch.setattr(fetch, "address_allowed", lambda address: True)
    assert decode_image(f"{image_server}/image.png", REMOTE, "p") == image_bytes()
    with pytest.raises(APIError, match="redirects are not followed"):
        decode_image(f"{image_server}/redirect", REMOTE, "p")
    assert ImageServer.requests == ["/image.png", "/redirect"]  # the redirect's target was not fetched
    with pytest.raises(APIError) as raised:
        decode_image(f"{image_server}/big", REMOTE, "p")
    assert raised.value.status == 413
    with pytest.raises(APIError) as raised:
        decode_image(f"{image_server}/slow", Limits(allow_remote_images=True, remote_image_timeout_s=0.5), "p")
    assert raised.value.message == "could not fetch the image"
    with pytest.raises(APIError, match="HTTP 404"):
        decode_image(f"{image_server}/missing", REMOTE, "p")


def test_network_errors_are_not_echoed(monkeypatch):
    import socket

    monkeypatch.setattr(fetch, "address_allowed", lambda address: True)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(APIError) as raised:
        decode_image(f"http://127.0.0.1:{port}/a.png", REMOTE, "p")
    assert raised.value.body()["error"]["message"] == "could not fetch the image"

    def no_such_name(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known: internal-dns.corp.example")

    monkeypatch.setattr(fetch.socket, "getaddrinfo", no_such_name)
    with pytest.raises(APIError) as raised:
        decode_image("http://images.example.com/a.png", REMOTE, "p")
    assert raised.value.body()["error"]["message"] == "could not fetch the image"


def test_the_default_body_limit_leaves_room_for_the_most_images():
    limits = Limits()
    assert limits.max_body_bytes > limits.max_images * limits.max_image_bytes * 4 / 3 + 64 * 1024
