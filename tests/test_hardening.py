"""The running app against hostile files and load, through gradio_client on 127.0.0.1."""
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import ASSETS, AppServer, bomb_png, png_with_bad_crc, truncated_image, ztxt_bomb_png
from PIL import Image

HOSTILE = {
    "page.png": (b"<!doctype html><html>hello</html>", "not an image"),
    "empty.jpg": (b"", "not an image"),
    "half.png": ((ASSETS / "horse_mask.png").read_bytes()[:400], "truncated or corrupt"),
    "half.jpg": ((ASSETS / "chelsea.jpg").read_bytes()[:4000], "truncated or corrupt"),
    "bomb.png": (bomb_png(30000, 30000), "decompression bomb"),
    "wide.png": (bomb_png(60000, 1000), "over the 50.0 MP limit"),
    "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>', "not an image"),
    "archive.zip": (b"PK\x03\x04" + b"\0" * 100, "not an image"),
    "ztxt.png": (ztxt_bomb_png(), "text chunk inflates past"),
    "cut.webp": (truncated_image("WEBP"), "WebP image (cut.webp) is truncated or corrupt"),
    "crc.png": (png_with_bad_crc(), "checksum is wrong"),
}


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server.url, verbose=False)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_upload_gets_a_readable_error_and_the_app_goes_on(client, app_server, tmp_path, name):
    data, message = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(Exception) as error:
        client.predict(handle_file(str(path)), api_name="/image")
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)
    result = client.predict(handle_file(str(ASSETS / "chelsea.jpg")), api_name="/image")
    assert Image.open(result[1]).size == (451, 300)
    assert app_server.alive()


def test_hostile_url_gets_a_readable_error(client, image_server):
    with pytest.raises(Exception, match="did not return an image"):
        client.predict(image_server.url + "LICENSES.md", api_name="/text")
    with pytest.raises(Exception, match="only http and https"):
        client.predict("file:///etc/passwd", api_name="/text")


def test_url_tab_refuses_loopback_unless_allowed(image_server):
    server = AppServer("--model", "u2netp").wait()  # no --allow-private-urls
    try:
        guarded = Client(server.url, verbose=False)
        with pytest.raises(Exception, match="loopback address"):
            guarded.predict(image_server.url + "chelsea.jpg", api_name="/text")
    finally:
        server.stop()


def test_a_bad_file_in_a_batch_does_not_sink_the_others(client, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"<html>")
    gallery, archive, info = client.predict(
        [handle_file(str(ASSETS / "chelsea.jpg")), handle_file(str(bad)), handle_file(str(ASSETS / "coffee.jpg"))],
        api_name="/batch")
    assert len(gallery) == 2
    assert "2 done, 1 failed" in info and "bad.png: not an image" in info


# -- load ----------------------------------------------------------------------------------------

def unique_inputs(folder: Path, count: int) -> list[Path]:
    """`count` different PNGs: crops of the photos, each a size of its own."""
    photos = [Image.open(ASSETS / n).convert("RGB") for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        crop = photo.crop((i % 40, i % 30, photo.width - 40 + i % 40, photo.height - 30 + i % 30))
        crop = crop.resize((160 + i, 120 + (i * 7) % 90))
        path = folder / f"in{i:03d}.png"
        crop.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """An app whose concurrent requests share network batches of up to 4 images, with its temp
    files in folders of its own and short cleaning times (bench/soak.py measures it for longer)."""
    scratch = tmp_path_factory.mktemp("app-tmp")
    server = AppServer("--model", "u2netp", "--max-batch", "4", env={
        "TMPDIR": str(scratch), "RMBG_DELETE_CACHE": "5,10", "RMBG_OUTPUT_MAX_AGE": "10"}).wait()
    server.temp_folders = [scratch, Path(server.gradio_tmp)]
    yield server
    server.stop()


def shared_batches(log: str) -> list[tuple[int, int]]:
    """(images, requests) of every network batch that several requests shared, of any size."""
    return [(int(n), int(m)) for n, m in re.findall(r"one batch of (\d+) images for (\d+) requests", log)]


def test_concurrent_requests_share_network_batches_and_a_bad_upload_fails_alone(batching_server, tmp_path):
    """With request batching on, a bad upload fails alone: the good requests around it, sharing
    network batches, are answered with their own cut-outs."""
    client = Client(batching_server.url, verbose=False)
    names = ["chelsea.jpg", "page.png", "coffee.jpg", "half.jpg", "astronaut.jpg", "rocket.jpg"] * 2
    for name in HOSTILE:
        (tmp_path / name).write_bytes(HOSTILE[name][0])
    for _round in range(3):  # sharing depends on arrival times; a round without any is retried
        seen = len(shared_batches(batching_server.output()))
        uploads = [(name, client.submit(handle_file(str(tmp_path / name if name in HOSTILE else ASSETS / name)),
                                        api_name="/image")) for name in names]
        for name, job in uploads:
            if name in HOSTILE:
                with pytest.raises(Exception, match=HOSTILE[name][1]):
                    job.result(timeout=300)
            else:
                cut = np.asarray(Image.open(job.result(timeout=300)[1]))
                assert np.array_equal(cut[..., :3], np.asarray(Image.open(ASSETS / name).convert("RGB"))), name
        if len(shared_batches(batching_server.output())) > seen:
            break
    else:
        pytest.fail(f"no network batch was shared in 3 rounds:\n{batching_server.output()[-3000:]}")
    assert batching_server.alive()


def files_in(folders) -> set[Path]:
    return {p for folder in folders for p in folder.rglob("*") if p.is_file()}


def test_load_every_answer_is_its_own_and_temp_files_are_cleaned_up(batching_server, tmp_path):
    """8 concurrent clients, 16 different images (two each): each answer is its own cut-out, batches never
    exceed the cap, and every temp file the requests made is deleted eventually. Memory and
    temp-folder size over 1,000+ requests: bench/soak.py."""
    baseline = files_in(batching_server.temp_folders)
    *inputs, later = unique_inputs(tmp_path, 17)  # `later`: the requests after the load (below)
    clients = [Client(batching_server.url, verbose=False) for _ in range(8)]

    def one(i):
        return i, np.asarray(Image.open(clients[i % 8].predict(handle_file(str(inputs[i])), api_name="/image")[1]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, cut in pool.map(one, range(len(inputs))):
            original = np.asarray(Image.open(inputs[i]))
            assert cut.shape[:2] == original.shape[:2], i
            assert np.array_equal(cut[..., :3], original), f"request {i} got another request's cut-out"
    batches = shared_batches(batching_server.output())
    assert batches and all(m <= n <= 4 for n, m in batches), batches  # shared, and never over the cap
    made = files_in(batching_server.temp_folders) - baseline
    assert made
    # Gradio's cleaning (every 5 s, files older than 10 s) and our own output folders' pruning
    # (by the next request, folders older than 10 s) remove all of them in time. The later requests
    # send an image of their own: one of the load's would make its files again (cached by content).
    for _ in range(60):
        left = made & files_in(batching_server.temp_folders)
        if not left:
            break
        time.sleep(3)
        clients[0].predict(handle_file(str(later)), api_name="/image")
    else:
        pytest.fail(f"{len(left)} temp files never cleaned up, e.g. {sorted(left)[:3]}")
    assert batching_server.alive()


def test_cache_cleaning_goes_on_while_requests_add_files(tmp_path, request):
    """Gradio's scheduled cleaner walks its live set of cached files; a request that caches a
    file meanwhile used to end the cleaning for good ("Set changed size during iteration")."""
    import threading

    import gradio as gr
    from gradio import route_utils

    from rmbg_demo.gradio_compat import guard_cache_cleaning

    request.addfinalizer(guard_cache_cleaning())  # Gradio's own cleaner comes back after this test
    with gr.Blocks() as demo:
        gr.Markdown("cache")
    cached = set()
    for i in range(3000):
        (tmp_path / f"old{i}").touch()
        cached.add(str(tmp_path / f"old{i}"))
    demo.temp_file_sets.append(cached)
    time.sleep(1.2)
    cleaning_done, traffic_started = threading.Event(), threading.Event()

    def request_traffic():
        for i in range(200_000):  # bounded; stops as soon as the cleaning round is over
            if cleaning_done.is_set():
                return
            (tmp_path / f"new{i}").touch()
            cached.add(str(tmp_path / f"new{i}"))
            traffic_started.set()

    traffic = threading.Thread(target=request_traffic)
    traffic.start()
    assert traffic_started.wait(30)  # requests are adding files before the cleaning round begins
    try:
        route_utils.delete_files_created_by_app(demo, 1)  # the name Gradio's scheduler calls
    finally:
        cleaning_done.set()
        traffic.join()
    assert not list(tmp_path.glob("old*")) and not any("old" in f for f in cached)
    new_files = list(tmp_path.glob("new*"))
    assert new_files and all(str(f) in cached for f in new_files)  # young files are kept, and still tracked
