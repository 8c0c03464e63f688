"""`rmbg serve` as clients see it: the plain server (uvicorn in this process, no Ray) with u2netp on 127.0.0.1,
real HTTP. The same app on Ray Serve: test_serve_ray.py."""
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import ASSETS, AppServer, bomb_png, free_port, png_with_bad_crc, truncated_image, ztxt_bomb_png
from PIL import Image

from rmbg_demo.client import RemoteError, RemoteRemover
from rmbg_demo.compose import replace_background
from rmbg_demo.service.plain import ServiceThread
from rmbg_demo.service.settings import ServeSettings

MAX_BYTES = 300_000
MAX_BATCH = 4
MAX_QUEUED = 4  # waiting beyond the 2 * MAX_BATCH being served: room for the 8 clients, not for 48
MAX_MEMORY = 64 * 2**20  # the image memory budget: a 2000x2000 picture needs ~128 MB
SETTINGS = ServeSettings(model="u2netp", max_batch=MAX_BATCH, max_queued=MAX_QUEUED, max_bytes=MAX_BYTES,
                         allow_private_urls=True, max_memory=MAX_MEMORY)


@pytest.fixture(scope="module")
def service():
    server = ServiceThread(SETTINGS)
    yield server.url
    server.stop()


def post(url, data: bytes, query="", content_type="application/octet-stream", timeout=120, headers=None,
         route="/remove"):
    """(status, headers, body) of a POST; HTTP errors are answers too."""
    request = urllib.request.Request(f"{url}{route}{query}", data=data, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()  # case-insensitive headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def patch_photo(colour, size=(48, 40), offset=(0, 0)) -> bytes:
    """A solid colour patch in the middle of a grey frame (moved by `offset` eighths), as PNG."""
    width, height = size
    pixels = np.full((height, width, 3), 128, np.uint8)
    left, top = width // 4 + offset[0] * width // 8, height // 4 + offset[1] * height // 8
    pixels[top:top + height // 2, left:left + width // 2] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def opened(body: bytes) -> Image.Image:
    return Image.open(io.BytesIO(body))


def test_remove_answers_the_image_in_every_input_form(service, image_server):
    photo = patch_photo((200, 30, 40))
    status, headers, body = post(service, photo)
    assert status == 200, body
    assert headers["Content-Type"] == "image/png" and headers["X-Model"] == "u2netp"
    assert headers["X-Network-Size"] == "320x320"
    assert "network;dur=" in headers["Server-Timing"] and float(headers["X-Seconds"]) > 0
    cut = opened(body)
    assert cut.mode == "RGBA" and cut.size == (48, 40)
    assert cut.getpixel((24, 20))[:3] == (200, 30, 40)  # the subject keeps its own pixels

    boundary = "rmbgboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    status, headers, body = post(service, form, "?mask=1&format=webp",
                                 content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200, body
    assert headers["Content-Type"] == "image/webp"
    mask = opened(body)
    assert mask.size == (48, 40) and mask.mode in ("L", "RGB")
    assert np.array_equal(np.asarray(mask.convert("L")), np.asarray(cut.getchannel("A")))  # lossless webp

    status, headers, body = post(service, json.dumps({"url": image_server.url + "chelsea.jpg"}).encode(),
                                 "?background=%2300ff00", content_type="application/json")
    assert status == 200, body
    assert opened(body).mode == "RGB" and opened(body).size == (451, 300)

    models = json.loads(urllib.request.urlopen(f"{service}/models", timeout=30).read())
    assert models["default"] == "u2netp"
    assert {"name": "u2netp", "available": True}.items() <= next(
        m for m in models["models"] if m["name"] == "u2netp").items()


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def multipart(*fields: tuple[str, bytes], boundary="rmbgboundary", end=True) -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in fields)
    return body + (f"--{boundary}--\r\n".encode() if end else b"")


FORM = "multipart/form-data; boundary=rmbgboundary"
PHOTO = (ASSETS / "chelsea.jpg").read_bytes()
BAD_INPUTS = {  # case -> (body, query, content type, status, words the error must hold)
    "junk": (b"<html>not an image</html>", "", None, 400, "not an image"),
    "truncated": (PHOTO[:len(PHOTO) // 3], "", None, 400, "truncated or corrupt"),
    "bomb": (bomb_png(100_000, 100_000), "", None, 400, "decompression bomb"),
    "ztxt_bomb": (ztxt_bomb_png(), "", None, 400, "text chunk inflates past"),
    "broken_chunk": (png_with_bad_crc(), "", None, 400, "checksum is wrong"),
    "truncated_webp": (truncated_image("WEBP"), "", None, 400, "truncated or corrupt"),
    "too_big": (b"\xff" * (MAX_BYTES + 1), "", None, 413, "byte limit"),
    "bad_format": (PHOTO, "?format=gif", None, 400, "format 'gif'"),
    "bad_colour": (PHOTO, "?background=notacolour", None, 400, "background 'notacolour'"),
    "bad_size": (PHOTO, "?size=1000", None, 400, "size '1000'"),
    "empty": (b"", "", None, 400, "empty body"),
    "multipart_no_boundary": (multipart(("image", PHOTO)), "", "multipart/form-data", 400, "no boundary"),
    "multipart_garbage": (b"garbage" * 100 + b"--rmbgboundary--", "", FORM, 400, "malformed multipart"),
    "multipart_many_fields": (multipart(*[(f"f{i}", b"x") for i in range(1000)]), "", FORM, 400,
                              "malformed multipart"),
    "multipart_cut_short": (multipart(("image", PHOTO), end=False), "", FORM, 400, "closing boundary"),
    "multipart_no_image": (multipart(("picture", PHOTO)), "", FORM, 400, "'picture': no such field"),
    "unknown_setting": (PHOTO, "?backgruond=red", None, 400, "backgruond 'red': no such setting"),
    "json_not_an_object": (b"[1, 2]", "", "application/json", 400, "must be an object"),
    "json_bad": (b"{url:", "", "application/json", 400, "not valid JSON"),
    "over_the_memory_budget": (png_of(Image.new("L", (2000, 2000))), "", None, 413, "budget for images"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_the_service_stays_up(service, case):
    data, query, kind, expected, words = BAD_INPUTS[case]
    status, headers, body = post(service, data, query, content_type=kind or "application/octet-stream")
    assert status == expected, body
    assert headers["Content-Type"] == "application/json" and words in json.loads(body)["error"]
    assert urllib.request.urlopen(f"{service}/healthz", timeout=30).status == 200


def test_a_url_that_is_no_image_and_a_wrong_method_are_client_errors(service, image_server):
    status, _, body = post(service, json.dumps({"url": image_server.url + "LICENSES.md"}).encode(),
                           content_type="application/json")
    assert status == 400, body
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{service}/remove", timeout=30)  # a GET
    assert refused.value.code == 405 and refused.value.headers["Allow"] == "POST"


def test_concurrent_clients_get_their_own_images(service):
    assert clients_get_their_own_images(service) == []


def clients_get_their_own_images(service, headers=None, retries_on_503: int = 0) -> list[str]:
    """8 clients at once (their requests share network batches), each image a distinct colour, size and
    subject placement: every answer holds its own input's pixels and its own input's mask (the size and
    centre colour alone come from the request's own image whatever mask a mixed-up batch gave it). Small
    here (the 8 x 100 run with memory is bench/serve.py). `retries_on_503`: a client that backs off and asks
    again when told the queue is full. The problems found, if any."""
    from rmbg_demo.pipeline import RemovalPipeline

    local = RemovalPipeline("u2netp")

    def client(index: int) -> list[str]:
        problems = []
        for request in range(2):
            colour = ((37 * index + 11 * request) % 256, (91 * request + 50) % 256, (23 * index + 160) % 256)
            size = (32 + 4 * index, 24 + 2 * request)
            photo = patch_photo(colour, size, offset=(index % 3, request % 2))
            status, _, body = post(service, photo, headers=headers)
            for _ in range(retries_on_503):
                if status != 503:
                    break
                time.sleep(0.5)
                status, _, body = post(service, photo, headers=headers)
            if status != 200:
                problems.append(f"{index}/{request}: {status} {body[:100]!r}")
                continue
            cut = opened(body)
            if cut.size != size or cut.getpixel((size[0] // 2, size[1] // 2))[:3] != colour:
                problems.append(f"{index}/{request}: got {cut.size} {cut.getpixel((size[0] // 2, size[1] // 2))}")
            elif not np.array_equal(np.asarray(cut.getchannel("A")), np.asarray(local(photo).mask)):
                problems.append(f"{index}/{request}: the mask of another request")
        return problems

    with ThreadPoolExecutor(8) as pool:
        return [p for found in pool.map(client, range(8)) for p in found]


def test_a_full_queue_answers_503_and_the_rest_are_served(service):
    assert full_queue_statuses(service) == "ok"


def full_queue_statuses(service, headers=None) -> str:
    """48 requests at once against 8 served and 4 queued: some are refused with 503, none lost or broken;
    "ok", or what went wrong."""
    gate = threading.Barrier(48)

    def one(index):
        gate.wait()
        return post(service, patch_photo((index * 5, 90, 200)), headers=headers)[0]

    with ThreadPoolExecutor(48) as pool:
        statuses = list(pool.map(one, range(48)))
    if not (set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 1):
        return f"statuses {sorted(statuses)}"
    after = post(service, patch_photo((10, 20, 30)), headers=headers)[0]
    return "ok" if after == 200 else f"after the burst: {after}"


def test_remote_remover_client(service):
    remote = RemoteRemover(service)
    assert remote.healthy()
    body, headers = remote.remove(patch_photo((250, 120, 0)), background="#0000ff", format="png")
    assert headers["X-Model"] == "u2netp"
    assert opened(body).mode == "RGB"
    with pytest.raises(RemoteError) as error:
        remote.remove(b"not an image")
    assert error.value.status == 400 and "not an image" in str(error.value)
    assert not RemoteRemover(f"http://127.0.0.1:{free_port()}").healthy()


@pytest.fixture(scope="module")
def page_on_service(service):
    """`python app.py --backend URL`: the page sends its work to the running service."""
    page = AppServer("--backend", service).wait()
    yield page
    page.stop()


def test_the_page_sends_its_work_to_the_service(page_on_service, service, tmp_path):
    client = Client(page_on_service.url, verbose=False)
    photo = tmp_path / "patch.png"
    photo.write_bytes(patch_photo((250, 120, 0), (64, 48)))
    result = client.predict(handle_file(str(photo)), "u2netp", "colour", "#0000ff", None, False, "png",
                            api_name="/image")
    assert f"served by {service}" in result[4] and "[u2netp] at 320x320" in result[4]
    _, _, served_mask = post(service, photo.read_bytes(), "?mask=1")
    assert np.array_equal(np.asarray(Image.open(result[2])), np.asarray(opened(served_mask)))  # the service's mask
    # Composed here, over the colour asked for, with the service's mask.
    expected = replace_background(Image.open(photo).convert("RGB"), opened(served_mask), (0, 0, 255))
    assert np.array_equal(np.asarray(Image.open(result[1])), np.asarray(expected))

    # The resolution setting travels to the service, which refuses what its model cannot run.
    with pytest.raises(Exception, match="runs at 320x320 only"):
        client.predict(handle_file(str(photo)), "u2netp", "transparent", "#ffffff", None, False, "png", "512",
                       api_name="/image")
    # A bad file in a batch fails alone, here, before any request to the service.
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    gallery, archive, info = client.predict([handle_file(str(photo)), handle_file(str(junk))], api_name="/batch")
    assert len(gallery) == 1 and "1 done, 1 failed" in info and "junk.png" in info
    assert page_on_service.alive()


def test_the_page_refuses_to_start_without_its_service():
    nobody = f"http://127.0.0.1:{free_port()}"
    page = AppServer("--backend", nobody)
    assert page.process.wait(timeout=120) == 2
    assert f"cannot reach {nobody}" in page.output() and "rmbg serve" in page.output()
