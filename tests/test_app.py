"""The running app through gradio_client, as a script written for BRIA's Space calls it."""
import zipfile

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from conftest import ASSETS


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server.url, verbose=False)


def slider_pair(value):
    """gradio_client gives the ImageSlider's two images as a pair of file paths."""
    first, second = value
    return Image.open(first), Image.open(second)


def test_image_endpoint_answers_like_the_space(client):
    result = client.predict(handle_file(str(ASSETS / "chelsea.jpg")), api_name="/image")
    after, before = slider_pair(result[0])
    png = Image.open(result[1])
    assert png.format == "PNG" and png.mode == "RGBA" and png.size == (451, 300)
    assert after.size == before.size == (451, 300)
    mask = Image.open(result[2])
    assert mask.mode == "L" and mask.size == (451, 300)
    assert np.array_equal(np.asarray(png)[..., 3], np.asarray(mask))
    assert "u2netp" in result[4]


def test_text_endpoint_fetches_a_url(client, image_server):
    result = client.predict(image_server.url + "astronaut.jpg", api_name="/text")
    png = Image.open(result[1])
    assert png.mode == "RGBA" and png.size == (512, 512)
    assert result[1].endswith("astronaut-nobg.png")


def test_concurrent_requests_each_get_their_own_result(client):
    # BRIA's Space wrote every result to one fixed file name, so simultaneous users could
    # receive each other's cut-outs; here each request writes into a folder of its own.
    names = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"] * 2
    jobs = [client.submit(handle_file(str(ASSETS / name)), api_name="/image") for name in names]
    for name, job in zip(names, jobs):
        result = job.result(timeout=300)
        assert Image.open(result[1]).size == Image.open(ASSETS / name).size
        assert result[1].endswith(name.replace(".jpg", "-nobg.png"))


def test_settings_background_colour_and_webp(client):
    result = client.predict(handle_file(str(ASSETS / "coffee.jpg")), "u2netp", "colour", "#ff0000", None, False,
                            "webp", api_name="/image")
    out = Image.open(result[1])
    assert out.format == "WEBP" and out.mode == "RGB" and out.size == (600, 400)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_batch_endpoint_returns_a_zip_of_cutouts_and_masks(client):
    files = [handle_file(str(ASSETS / n)) for n in ("chelsea.jpg", "rocket.jpg")]
    gallery, archive, info = client.predict(files, api_name="/batch")
    assert len(gallery) == 2
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["chelsea-mask.png", "chelsea-nobg.png", "rocket-mask.png", "rocket-nobg.png"]
    assert "2 done, 0 failed" in info


def test_batch_keeps_every_file_when_two_share_a_name(client, tmp_path):
    for folder, photo in (("a", "chelsea.jpg"), ("b", "coffee.jpg")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "photo.jpg").write_bytes((ASSETS / photo).read_bytes())
    files = [handle_file(str(tmp_path / folder / "photo.jpg")) for folder in ("a", "b")]
    gallery, archive, info = client.predict(files, api_name="/batch")
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["photo-2-mask.png", "photo-2-nobg.png", "photo-mask.png", "photo-nobg.png"]
        assert Image.open(z.open("photo-nobg.png")).size == (451, 300)  # chelsea, first
        assert Image.open(z.open("photo-2-nobg.png")).size == (600, 400)  # coffee, second
    assert "2 done, 0 failed" in info


def test_page_says_which_model_runs_and_how_to_enable_rmbg2(app_server):
    import urllib.request

    config = urllib.request.urlopen(app_server.url + "config", timeout=10).read().decode()
    assert "u2netp" in config
    assert "accept its licence at https://huggingface.co/briaai/RMBG-2.0" in config
    assert "HF_TOKEN" in config and "--weights" in config
