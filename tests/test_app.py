"""The running app through gradio_client, as a script written for BRIA's Space calls it."""
import zipfile

import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import ASSETS, AppServer, CountingHub
from PIL import Image

from rmbg_demo.compose import estimate_foreground, replace_background


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
    assert "[u2netp] at 320x320" in result[4]  # which model ran, at which network resolution


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


def test_batch_tab_with_a_background_image_refinement_and_webp(client, tmp_path):
    backdrop = tmp_path / "backdrop.png"
    Image.new("RGB", (40, 30), (20, 40, 220)).save(backdrop)
    files = [handle_file(str(ASSETS / n)) for n in ("chelsea.jpg", "coffee.jpg")]
    gallery, archive, info = client.predict(files, "u2netp", "image", "#ffffff", handle_file(str(backdrop)), True,
                                            "webp", api_name="/batch")
    assert "2 done, 0 failed" in info and len(gallery) == 2
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["chelsea-mask.webp", "chelsea-nobg.webp", "coffee-mask.webp",
                                        "coffee-nobg.webp"]
        for stem in ("chelsea", "coffee"):
            out = Image.open(z.open(f"{stem}-nobg.webp"))
            mask = Image.open(z.open(f"{stem}-mask.webp")).convert("L")
            assert out.format == "WEBP" and out.mode == "RGB"
            original = Image.open(ASSETS / f"{stem}.jpg").convert("RGB")
            backdrop_image = Image.open(backdrop)
            refined = np.asarray(replace_background(estimate_foreground(original, mask), mask, backdrop_image))
            plain = np.asarray(replace_background(original, mask, backdrop_image))
            assert np.array_equal(np.asarray(out), refined), stem  # the backdrop, and refined colours
            assert not np.array_equal(refined, plain)
            assert (np.asarray(out)[np.asarray(mask) == 0] == [20, 40, 220]).all()


def test_batch_tab_with_a_background_colour(client):
    gallery, archive, info = client.predict([handle_file(str(ASSETS / "rocket.jpg"))], "u2netp", "colour", "#00ff00",
                                            None, False, "png", api_name="/batch")
    assert "1 done, 0 failed" in info
    with zipfile.ZipFile(archive) as z:
        out = np.asarray(Image.open(z.open("rocket-nobg.png")))
        mask = np.asarray(Image.open(z.open("rocket-mask.png")))
    assert out.shape == mask.shape + (3,) and (mask == 0).any()
    assert (out[mask == 0] == [0, 255, 0]).all()


def test_compare_endpoint_refuses_one_model_and_a_bad_image(client, tmp_path):
    with pytest.raises(Exception, match=r"choose at least two models to compare \(registered: u2netp, rmbg-2.0"):
        client.predict(handle_file(str(ASSETS / "chelsea.jpg")), ["u2netp"], api_name="/compare")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"<!doctype html><html>hello</html>")
    with pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(bad)), ["u2netp", "birefnet-lite"], api_name="/compare")


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


def test_start_up_never_asks_the_hub_and_uncached_models_are_listed_not_downloaded():
    """A fresh machine, as a user starts the app: no HF_HUB_OFFLINE, no weights, no token. The
    page must not wait for (or download from) the hub to list models; a model that is not here
    is listed as a download, and choosing it says why it cannot run instead of hanging."""
    hub = CountingHub()
    server = AppServer(hub_url=hub.url)
    try:
        server.wait()
        print(f"\napp answered {server.startup_seconds:.1f} s after start (no HF_HUB_OFFLINE)")
        assert hub.requests == [], "start-up asked the hub"
        import urllib.request

        config = urllib.request.urlopen(server.url + "config", timeout=10).read().decode()
        assert "rmbg-2.0 (downloads on first use, ~885 MB)" in config
        assert "birefnet-lite (downloads on first use, ~179 MB)" in config
        client = Client(server.url, verbose=False)
        with pytest.raises(Exception, match=r"birefnet-lite cannot run here: could not download birefnet-lite "
                                            r"weights from the Hugging Face hub: download model.safetensors from "
                                            r"https://huggingface.co/ZhengPeng7/BiRefNet_lite"):
            client.predict(handle_file(str(ASSETS / "chelsea.jpg")), "birefnet-lite", api_name="/image")
        assert any("BiRefNet_lite" in request for request in hub.requests)  # asked only once chosen
        result = client.predict(handle_file(str(ASSETS / "chelsea.jpg")), api_name="/image")
        assert "u2netp" in result[4]  # the server stays up and the embedded model still answers
    finally:
        server.stop()
        hub.stop()
