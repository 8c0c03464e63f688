"""One request, four front ends, the same pictures: `rmbg remove`, `rmbg remove --ray`, the page (a real Gradio
server, through gradio_client) and the HTTP service (`rmbg serve`, real HTTP through our client) each take the
same settings matrix (model, network size, colour background, background image, refine, webp, mask) on the
same photos. u2netp must agree to the bit; BiRefNet lite (fixture weights, PyTorch) within 1/255.

The page runs in this process (a real server on 127.0.0.1; building it here saves an interpreter start and
a torch import), and so does the service (the plain server; test_serve_ray.py shows Ray Serve answers the
same bytes); the job runs on the tests' local Ray."""
import io
import shutil

import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import ASSETS, free_port, rmbg_in_process
from PIL import Image

from rmbg_demo.cli import build_parser
from rmbg_demo.client import RemoteRemover
from rmbg_demo.request import RemovalOptions

PHOTOS = ("chelsea.jpg", "coffee.jpg")
BACKDROP = ASSETS / "brick.jpg"

# name -> (CLI flags, the page's widgets after the model: background choice, colour, background image, refine,
# format, resolution); the model is each case's first flag.
CASES = {
    "u2netp colour webp mask": (["--model", "u2netp", "--background", "#3050a0", "--format", "webp", "--mask"],
                                ("colour", "#3050a0", None, False, "webp", "auto")),
    "u2netp image refine": (["--model", "u2netp", "--background", str(BACKDROP), "--refine", "--mask"],
                            ("image", "#ffffff", BACKDROP, True, "png", "auto")),
    "lite 512x384 transparent mask": (["--model", "birefnet-lite", "--size", "512x384", "--mask"],
                                      ("transparent", "#ffffff", None, False, "png", "512x384")),
    "u2netp framed: crop, canvas, bottom, shadow": (
        ["--model", "u2netp", "--background", "#f0f0f0", "--mask", "--crop", "--margin", "8%", "--canvas", "480x400",
         "--scale", "70%", "--position", "bottom", "--shadow", "drop"],
        ("colour", "#f0f0f0", None, False, "png", "auto", True, "8%", "480x400", "70%", "bottom", "drop", False)),
}


def pixels(source) -> np.ndarray:
    return np.asarray(Image.open(source), dtype=int)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(ASSETS / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def page(lite_weights_file):
    """The page with BiRefNet lite's fixture weights as its model (u2netp is embedded beside it)."""
    from rmbg_demo.ui import DemoConfig, build_demo

    demo = build_demo(DemoConfig(model="birefnet-lite", weights=str(lite_weights_file), device="cpu",
                                 dtype="float32", allow_private_urls=True))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


@pytest.fixture(scope="module")
def service(lite_weights_file):
    """`rmbg serve` with the same model and weights."""
    from rmbg_demo.service import ServeSettings
    from rmbg_demo.service.plain import ServiceThread

    settings = ServeSettings(model="birefnet-lite", weights=str(lite_weights_file), device="cpu", dtype="float32",
                             max_batch=2)
    server = ServiceThread(settings)
    yield RemoteRemover(server.url)
    server.stop()


def by_cli(photos, out, names, flags, *extra):
    run = rmbg_in_process("remove", *(photos / name for name in names), "-o", out, *flags, *extra)
    assert run.returncode == 0, run.stderr
    ext = "." + (flags[flags.index("--format") + 1] if "--format" in flags else "png")
    return {name: (pixels(out / f"{name.split('.')[0]}{ext}"), pixels(out / f"{name.split('.')[0]}_mask{ext}"))
            for name in names}


def by_page(client, names, model, widgets):
    choice, colour, backdrop, refine, fmt, resolution, *framing = widgets
    answers = {}
    for name in names:
        result = client.predict(handle_file(str(ASSETS / name)), model, choice, colour,
                                handle_file(str(backdrop)) if backdrop else None, refine, fmt, resolution, *framing,
                                api_name="/image")
        assert f"[{model}] at {resolution if resolution != 'auto' else '320x320'}" in result[4]
        answers[name] = (pixels(result[1]), pixels(result[2]))
    return answers


def by_service(remote, names, options):
    answers = {}
    for name in names:
        data = (ASSETS / name).read_bytes()
        image, headers = remote.remove(data, options.replace(mask=False))
        mask, _ = remote.remove(data, options.replace(mask=True))
        assert headers["X-Model"] == options.model
        answers[name] = (pixels(io.BytesIO(image)), pixels(io.BytesIO(mask)))
    return answers


@pytest.mark.parametrize("case", CASES)
def test_every_front_end_gives_the_same_pictures(case, photos, page, service, lite_weights_file, tmp_path):
    flags, widgets = CASES[case]
    model = flags[1]
    options = RemovalOptions.from_args(build_parser().parse_args(["remove", "x", "-o", "y", *flags]))
    # The page and the service were started with these (the CLI's --dtype auto is bfloat16 on some CPUs).
    engine = ["--weights", lite_weights_file, "--device", "cpu", "--dtype", "float32"] if model != "u2netp" else []
    names = PHOTOS if model == "u2netp" else PHOTOS[:1]  # one photo through the slower network
    results = {
        "cli": by_cli(photos, tmp_path / "cli", names, flags, *engine),
        "ray": by_cli(photos, tmp_path / "ray", names, flags, *engine, "--ray", "-q"),
        "page": by_page(page, names, model, widgets),
        "service": by_service(service, names, options),
    }
    budget = 0 if model == "u2netp" else 1
    reference = results["cli"]
    for front_end, answers in results.items():
        for name in names:
            for kind, got, expected in zip(("picture", "mask"), answers[name], reference[name]):
                assert got.shape == expected.shape, (front_end, name, kind)
                worst = np.abs(got - expected).max()
                assert worst <= budget, f"{front_end} differs from the CLI by {worst}/255 on {name}'s {kind}"
    mask = reference[names[0]][1]
    assert mask.std() > 4  # a mask with something in it (fixture weights give soft ones), not a constant
    if model == "u2netp":
        assert mask.min() < 10 and mask.max() > 245  # a real subject


def test_every_front_end_says_how_sure_it_is(photos, page, service, tmp_path):
    """The confidence score, the same number, in each front end's own place: the manifest (plain and --ray),
    the service's X-Confidence header, the page's info line and its Batch captions (lowest first on request)."""
    from rmbg_demo.pipeline import RemovalPipeline

    expected = {name: RemovalPipeline("u2netp")(photos / name).confidence for name in PHOTOS}
    assert len(set(expected.values())) == len(PHOTOS)
    for extra in ([], ["--ray", "-q"]):
        out = tmp_path / ("ray" if extra else "cli")
        run = rmbg_in_process("remove", photos, "-o", out, "--model", "u2netp", "--manifest", out / "m.jsonl",
                              *extra)
        assert run.returncode == 0, run.stderr
        lines = [__import__("json").loads(line) for line in (out / "m.jsonl").read_text().splitlines()]
        assert {line["input"].rsplit("/", 1)[-1]: line["confidence"] for line in lines} == expected
    for name in PHOTOS:
        _, headers = service.remove((photos / name).read_bytes(), RemovalOptions(model="u2netp"))
        assert float(headers["X-Confidence"]) == pytest.approx(expected[name], abs=1e-4)
        info = page.predict(handle_file(str(photos / name)), "u2netp", api_name="/image")[4]
        assert f"confidence {expected[name]:.2f}" in info
    gallery, _, _ = page.predict([handle_file(str(photos / name)) for name in PHOTOS], "u2netp", "transparent",
                                 "#ffffff", None, False, "png", "auto", lowest_first=True, api_name="/batch")
    captions = [item["caption"] for item in gallery]
    assert captions == [f"{name} · confidence {expected[name]:.2f}" for name in sorted(PHOTOS, key=expected.get)]
