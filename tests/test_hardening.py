"""The running app against hostile files and load, through gradio_client on 127.0.0.1."""
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import ASSETS, AppServer, bomb_png
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

def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def folder_usage(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


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


def test_concurrent_requests_in_shared_network_batches_hostile_files_among_them(tmp_path):
    """With request batching on, a bad upload fails alone: the good requests around it are answered."""
    server = AppServer("--model", "u2netp", "--max-batch", "4").wait()
    try:
        client = Client(server.url, verbose=False)
        uploads = []
        for name in ["chelsea.jpg", "page.png", "coffee.jpg", "half.jpg", "astronaut.jpg", "rocket.jpg"]:
            if name in HOSTILE:
                path = tmp_path / name
                path.write_bytes(HOSTILE[name][0])
            else:
                path = ASSETS / name
            uploads.append((name, client.submit(handle_file(str(path)), api_name="/image")))
        for name, job in uploads:
            if name in HOSTILE:
                with pytest.raises(Exception, match=HOSTILE[name][1]):
                    job.result(timeout=120)
            else:
                cut = np.asarray(Image.open(job.result(timeout=120)[1]))
                assert np.array_equal(cut[..., :3], np.asarray(Image.open(ASSETS / name).convert("RGB"))), name
        assert server.alive()
    finally:
        server.stop()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_load_every_answer_is_its_own_and_memory_and_temp_files_level_off(tmp_path):
    """8 concurrent clients, 200 requests, bounded in count and time, all on 127.0.0.1; requests
    share network batches of up to 4 images."""
    scratch = Path(tempfile.mkdtemp(prefix="rmbg-load-"))
    (scratch / "tmp").mkdir()
    server = AppServer("--model", "u2netp", "--max-batch", "4", env={
        "TMPDIR": str(scratch / "tmp"), "GRADIO_TEMP_DIR": str(scratch / "gradio"),
        "RMBG_DELETE_CACHE": "5,10", "RMBG_OUTPUT_MAX_AGE": "10"}).wait()
    inputs = unique_inputs(tmp_path, 200)
    samples = []
    try:
        clients = [Client(server.url, verbose=False) for _ in range(8)]

        def one(i):
            result = clients[i % 8].predict(handle_file(str(inputs[i])), api_name="/image")
            return i, np.asarray(Image.open(result[1]))

        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, 200, 50):
                for i, cut in pool.map(one, range(start, start + 50)):
                    original = np.asarray(Image.open(inputs[i]))
                    assert cut.shape[:2] == original.shape[:2], i
                    assert np.array_equal(cut[..., :3], original), f"request {i} got another request's cut-out"
                samples.append((start + 50, rss_mib(server.process.pid), *folder_usage(scratch)))
        time.sleep(25)  # two cleaning rounds of delete_cache and of our own output folders
        clients[0].predict(handle_file(str(inputs[0])), api_name="/image")  # prunes our folders
        time.sleep(1)
        after = (rss_mib(server.process.pid), *folder_usage(scratch))
        shared = re.findall(r"one batch of (\d) images for \d requests", server.output())
    finally:
        server.stop()
    print("\nrequests, RSS MiB, temp files, temp bytes:", *samples, "after idle:", after, sep="\n  ")
    print(f"network batches shared by several requests: {len(shared)}, largest {max(shared, default=1)}")
    assert shared and max(int(n) for n in shared) <= 4  # requests did share batches, never over the cap
    (_, rss_100, _, _), (_, rss_200, files_200, bytes_200) = samples[1], samples[3]
    assert rss_200 - rss_100 < 150, samples  # resident memory levels off after warm-up
    assert after[1] < files_200 / 4 and after[2] < bytes_200 / 4, (samples, after)  # temp files are cleaned


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
