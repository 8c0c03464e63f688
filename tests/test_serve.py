"""`rmbg serve` as clients see it: a real Ray Serve deployment of u2netp on 127.0.0.1, real HTTP."""
import io
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import ASSETS, AppServer, bomb_png, free_port
from PIL import Image
from ray import serve

from rmbg_demo.client import RemoteError, RemoteRemover
from rmbg_demo.cluster.serve import ServeSettings, replica_options, start_service
from rmbg_demo.compose import replace_background

MAX_BYTES = 300_000
MAX_BATCH = 4
MAX_QUEUED = 16  # waiting at the proxy, beyond 2 * MAX_BATCH at the replica: room for the 8 clients, not for 48


@pytest.fixture(scope="module")
def service(local_ray):
    settings = ServeSettings(model="u2netp", max_batch=MAX_BATCH, max_bytes=MAX_BYTES, allow_private_urls=True)
    url = start_service(settings, port=free_port(), max_queued=MAX_QUEUED)
    yield url
    serve.shutdown()


def post(url, data: bytes, query="", content_type="application/octet-stream", timeout=120):
    """(status, headers, body) of a POST; HTTP errors are answers too."""
    request = urllib.request.Request(f"{url}/remove{query}", data=data, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()  # case-insensitive headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def patch_photo(colour, size=(48, 40)) -> bytes:
    """A solid colour patch in the middle of a grey frame, as PNG."""
    width, height = size
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[height // 4:height * 3 // 4, width // 4:width * 3 // 4] = colour
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


@pytest.mark.parametrize("case", ["junk", "truncated", "bomb", "too_big", "bad_format", "bad_colour", "bad_size",
                                  "empty"])
def test_bad_input_is_a_clear_error_and_the_service_stays_up(service, case):
    photo = (ASSETS / "chelsea.jpg").read_bytes()
    data, query, expected = {
        "junk": (b"<html>not an image</html>", "", 400),
        "truncated": (photo[:len(photo) // 3], "", 400),
        "bomb": (bomb_png(100_000, 100_000), "", 400),
        "too_big": (b"\xff" * (MAX_BYTES + 1), "", 413),
        "bad_format": (photo, "?format=gif", 400),
        "bad_colour": (photo, "?background=notacolour", 400),
        "bad_size": (photo, "?size=1000", 400),
        "empty": (b"", "", 400),
    }[case]
    status, headers, body = post(service, data, query)
    assert status == expected
    assert headers["Content-Type"] == "application/json" and json.loads(body)["error"]
    assert urllib.request.urlopen(f"{service}/healthz", timeout=30).status == 200


def test_concurrent_clients_get_their_own_images(service):
    """8 clients at once (their requests share network batches), each image a distinct colour and size:
    every answer holds its own input's pixels. Small here (the 8 x 100 run with memory is bench/ray_job.py)."""
    def client(index: int) -> list[str]:
        problems = []
        for request in range(3):
            colour = ((37 * index + 11 * request) % 256, (91 * request + 50) % 256, (23 * index + 160) % 256)
            size = (32 + 4 * index, 24 + 2 * request)
            status, _, body = post(service, patch_photo(colour, size))
            if status != 200:
                problems.append(f"{index}/{request}: {status} {body[:100]!r}")
                continue
            cut = opened(body)
            if cut.size != size or cut.getpixel((size[0] // 2, size[1] // 2))[:3] != colour:
                problems.append(f"{index}/{request}: got {cut.size} {cut.getpixel((size[0] // 2, size[1] // 2))}")
        return problems

    with ThreadPoolExecutor(8) as pool:
        problems = [p for found in pool.map(client, range(8)) for p in found]
    assert problems == []


def test_a_full_queue_answers_503_and_the_rest_are_served(service):
    """48 requests at once against 8 served and 16 queued: some are refused with 503, none lost or broken."""
    gate = threading.Barrier(48)

    def one(index):
        gate.wait()
        return post(service, patch_photo((index * 5, 90, 200)))[0]

    with ThreadPoolExecutor(48) as pool:
        statuses = list(pool.map(one, range(48)))
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1
    assert post(service, patch_photo((10, 20, 30)))[0] == 200


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


def test_replica_options():
    assert replica_options("2", 0, 8, 64)["num_replicas"] == 2
    auto = replica_options("auto", 4, 8, 64)
    assert auto["autoscaling_config"]["max_replicas"] == 4 and auto["ray_actor_options"]["num_gpus"] == 1
    assert replica_options("1", 0, 8, 64)["ray_actor_options"]["num_gpus"] == 0
    with pytest.raises(ValueError, match="--replicas"):
        replica_options("many", 0, 8, 64)


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
