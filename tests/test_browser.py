"""The page in a real Chromium (Debian's, driven by Playwright): what a person does and sees."""
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
TIMEOUT = 120_000  # ms; the embedded model answers in about a second, a cold server takes longer


def chromium_missing() -> bool:
    return not (Path(CHROMIUM).exists() or shutil.which("chromium"))


if chromium_missing():
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser tests: apt-get install chromium chromium-driver", pytrace=False)
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(app_server.url)
    page.get_by_text("RMBG-2.0 for background removal").first.wait_for()
    yield page
    context.close()


def download(page, selector: str) -> bytes:
    link = page.locator(f"{selector} a[download]").first
    link.wait_for()
    with page.expect_download() as info:
        link.click()
    return Path(info.value.path()).read_bytes()


def wait_for_slider(page, prefix: str):
    images = page.locator(f"#{prefix}-slider img")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#{prefix}-slider img')].filter(i => i.complete && i.naturalWidth > 0).length >= 2")
    return images


def assert_cutout_and_mask(png: bytes, mask: bytes, size):
    cut = Image.open(io.BytesIO(png))
    alpha_mask = Image.open(io.BytesIO(mask))
    assert cut.format == "PNG" and cut.mode == "RGBA" and cut.size == size
    assert alpha_mask.mode == "L" and alpha_mask.size == size
    alpha = np.asarray(cut)[..., 3]
    assert np.array_equal(alpha, np.asarray(alpha_mask))
    assert alpha.min() == 0 and alpha.max() == 255  # some pixels removed, some kept


def test_upload_shows_the_slider_and_downloads_png_and_mask(page, tmp_path):
    page.locator("#input-image input[type=file]").set_input_files(str(ASSETS / "chelsea.jpg"))
    page.locator("#run-image").click()
    images = wait_for_slider(page, "image")
    assert images.count() >= 2
    assert "u2netp" in page.locator("#image-info").inner_text()
    assert_cutout_and_mask(download(page, "#image-png"), download(page, "#image-mask-file"), (451, 300))
    page.screenshot(path=str(tmp_path / "after-removal.png"), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / "after-removal.png", ASSETS / "screenshot.png")


def test_framing_settings_give_a_framed_download_and_the_confidence(page):
    """The Settings -> Framing group as a person uses it: crop, a canvas, a drop shadow; the download is the
    canvas's size with the subject's mask through the same geometry, and the info line says how sure it is."""
    page.locator(".label-wrap", has_text="Settings").first.click()
    page.locator("#framing .label-wrap").first.click()
    page.locator("#crop input").check()
    page.locator("#margin textarea, #margin input").first.fill("6%")
    page.locator("#canvas textarea, #canvas input").first.fill("500x400")
    page.locator("#shadow").get_by_label("drop").check()
    page.locator("#input-image input[type=file]").set_input_files(str(ASSETS / "coffee.jpg"))
    page.locator("#run-image").click()
    wait_for_slider(page, "image")
    assert "confidence 0." in page.locator("#image-info").inner_text()
    framed = Image.open(io.BytesIO(download(page, "#image-png")))
    mask = Image.open(io.BytesIO(download(page, "#image-mask-file")))
    assert framed.size == mask.size == (500, 400) and framed.mode == "RGBA"
    shadow = np.asarray(framed)[..., 3].astype(int) - np.asarray(mask, int)
    assert shadow.min() >= 0 and shadow.max() > 20  # the shadow is in the picture's alpha, not the mask


def test_url_tab_against_a_local_server(page, image_server):
    page.get_by_role("tab", name="input url").click()
    page.locator("#input-url textarea").fill(image_server.url + "coffee.jpg")
    page.locator("#run-url").click()
    wait_for_slider(page, "url")
    assert_cutout_and_mask(download(page, "#url-png"), download(page, "#url-mask-file"), (600, 400))


def test_batch_tab_zip(page):
    page.get_by_role("tab", name="Batch").click()
    page.locator("#batch-files input[type=file]").set_input_files(
        [str(ASSETS / "chelsea.jpg"), str(ASSETS / "astronaut.jpg")])
    page.locator("#run-batch").click()
    page.get_by_text("2 done, 0 failed").wait_for()
    with zipfile.ZipFile(io.BytesIO(download(page, "#batch-zip"))) as archive:
        names = sorted(archive.namelist())
        assert names == ["astronaut-mask.png", "astronaut-nobg.png", "chelsea-mask.png", "chelsea-nobg.png"]
        assert Image.open(io.BytesIO(archive.read("astronaut-nobg.png"))).size == (512, 512)
    assert page.locator("#batch-gallery img").count() >= 2


def test_a_bad_upload_shows_a_readable_error(page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes((ASSETS / "horse_mask.png").read_bytes()[:200])
    page.locator("#input-image input[type=file]").set_input_files(str(bad))
    page.locator("#run-image").click()
    page.get_by_text("truncated or corrupt").first.wait_for()
    assert "Traceback" not in page.content()


@pytest.fixture(scope="module")
def compare_server(tmp_path_factory):
    """An app that finds RMBG-1.4 weights (the parity fixture's) in its Hugging Face cache."""
    import parity
    from helpers import AppServer
    from safetensors.torch import save_file

    from rmbg_demo import build_model

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--briaai--RMBG-1.4"
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    model = build_model("rmbg-1.4")
    save_file(parity.deterministic_state_dict(model), str(repo / "snapshots" / commit / "model.safetensors"))
    server = AppServer(env={"HF_HUB_CACHE": str(cache)}).wait()
    yield server
    server.stop()


def test_compare_tab_shows_each_models_cutout_and_time(browser, compare_server):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    try:
        page.goto(compare_server.url)
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-image input[type=file]").set_input_files(str(ASSETS / "astronaut.jpg"))
        models = page.locator("#compare-models")
        assert "rmbg-1.4" in models.inner_text() and "u2netp" in models.inner_text()
        page.locator("#run-compare").click()
        info = page.locator("#compare-info")
        page.get_by_text("[rmbg-1.4]").first.wait_for()
        text = info.inner_text()
        assert "BRIA RMBG-1.4" in text and "[u2netp]" in text and "seconds" in text
        assert page.locator("#compare-gallery img").count() >= 2
    finally:
        context.close()


def test_video_tab_plays_the_transparent_result(page, tmp_path):
    """A clip dropped on the video tab comes back as a WebM with alpha that the browser plays
    (readyState and currentTime advance), with the video and its matte to download."""
    import av
    from test_video import moving_subject, write_clip

    images, _ = moving_subject(frames=8)
    clip = tmp_path / "walk.mp4"
    write_clip(clip, images)
    page.get_by_role("tab", name="video").click()
    page.locator("#video-input input[type=file]").set_input_files(str(clip))
    page.locator("#run-video").click()
    page.get_by_text("8 frames at").wait_for()
    video = page.locator("#video-result video")
    video.wait_for()
    page.wait_for_function("() => { const v = document.querySelector('#video-result video');"
                           " return v && v.readyState >= 2; }")
    page.evaluate("() => document.querySelector('#video-result video').play()")
    page.wait_for_function("() => document.querySelector('#video-result video').currentTime > 0")
    webm = tmp_path / "result.webm"
    webm.write_bytes(download(page, "#video-files"))
    with av.open(str(webm)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "vp9"
        decoder = av.CodecContext.create("libvpx-vp9", "r")  # FFmpeg's own vp9 decoder drops alpha
        frames = [f for packet in container.demux(stream) for f in decoder.decode(packet)]
    assert len(frames) == 8 and frames[0].format.name == "yuva420p"
