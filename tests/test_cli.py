"""The `remove` command as a user types it: real files in, real files out, bad files reported.

The command runs through the CLI's own `main` in this process (helpers.rmbg_in_process); one test runs
`python -m rmbg_demo`, one the installed `rmbg` script."""
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS, hermetic_env, rmbg_in_process
from PIL import Image

from rmbg_demo.compose import cutout, refine_cutout, replace_background

PHOTOS = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"]


def rmbg_process(*args):
    """`python -m rmbg_demo ARGS` as a user runs it, with no weights, token or hub of the developer's
    (helpers.hermetic_env)."""
    return subprocess.run([sys.executable, "-m", "rmbg_demo", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=hermetic_env())


rmbg = rmbg_in_process  # the command's behaviour; the tests of the process itself use rmbg_process


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(ASSETS / name, folder / name)
    return folder


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_batch_with_bad_files_writes_the_good_ones_and_fails(photos, tmp_path):
    (photos / "notes.jpg").write_text("<html>not a photo</html>")
    (photos / "cut.png").write_bytes((ASSETS / "horse_mask.png").read_bytes()[:300])
    before = digest(photos)
    out = tmp_path / "out"
    run = rmbg_process("remove", photos / "chelsea.jpg", photos / "notes.jpg", photos / "cut.png", photos / "coffee.jpg",
               photos / "astronaut.jpg", "-o", out, "--model", "u2netp", "--device", "cpu", "--dtype", "float32",
               "--batch-size", "2", "--mask", "--format", "png")
    assert run.returncode == 1, run.stderr
    assert "notes.jpg: not an image (notes.jpg)" in run.stderr
    assert "cut.png) is truncated or corrupt" in run.stderr
    assert "3 written, 2 failed, 0 skipped" in run.stderr
    assert "model: U\u00b2-Net-p" in run.stderr
    for name in PHOTOS:
        stem = name.rsplit(".", 1)[0]
        cut = Image.open(out / f"{stem}.png")
        mask = Image.open(out / f"{stem}_mask.png")
        original = Image.open(ASSETS / name)
        assert cut.mode == "RGBA" and cut.size == original.size
        assert mask.mode == "L" and mask.size == original.size
        assert np.array_equal(np.asarray(cut)[..., 3], np.asarray(mask))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n.rsplit('.', 1)[0]}{s}.png" for n in PHOTOS for s in ("", "_mask")])  # no temp files left
    assert digest(photos) == before


def test_existing_outputs_are_kept_unless_overwrite(photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "chelsea.png").write_bytes(b"precious")
    run = rmbg("remove", photos / "chelsea.jpg", "-o", out, "--model", "u2netp")
    assert run.returncode == 0, run.stderr
    assert "0 written, 0 failed, 1 skipped (outputs exist; --overwrite replaces them)" in run.stderr
    assert (out / "chelsea.png").read_bytes() == b"precious"
    run = rmbg("remove", photos / "chelsea.jpg", "-o", out, "--model", "u2netp", "--overwrite")
    assert run.returncode == 0, run.stderr
    assert Image.open(out / "chelsea.png").mode == "RGBA"


def test_refuses_to_write_over_its_inputs(tmp_path):
    shutil.copy(ASSETS / "horse_mask.png", tmp_path / "horse.png")
    before = digest(tmp_path)
    run = rmbg("remove", tmp_path / "horse.png", "-o", tmp_path, "--model", "u2netp", "--overwrite")
    assert run.returncode == 1
    assert "would overwrite an input" in run.stderr
    assert digest(tmp_path) == before


def test_folders_recursion_and_globs(photos, tmp_path):
    nested = photos / "more"
    nested.mkdir()
    shutil.copy(ASSETS / "rocket.jpg", nested / "rocket.jpg")
    flat = rmbg("remove", photos, "-o", tmp_path / "flat", "--model", "u2netp", "-q")
    assert flat.returncode == 0, flat.stderr
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["astronaut.png", "chelsea.png", "coffee.png"]
    deep = rmbg("remove", photos, "--recursive", "-o", tmp_path / "deep", "--model", "u2netp", "-q")
    assert (tmp_path / "deep" / "rocket.png").exists(), deep.stderr
    globbed = rmbg("remove", str(photos / "c*.jpg"), "-o", tmp_path / "glob", "--model", "u2netp", "-q")
    assert sorted(p.name for p in (tmp_path / "glob").iterdir()) == ["chelsea.png", "coffee.png"], globbed.stderr
    missing = rmbg("remove", str(photos / "*.tiff"), "-o", tmp_path / "none", "--model", "u2netp")
    assert missing.returncode == 1 and "*.tiff" in missing.stderr


def test_webp_background_and_refine(photos, tmp_path):
    out = tmp_path / "out"
    run = rmbg("remove", photos / "chelsea.jpg", "-o", out, "--model", "u2netp", "--format", "webp", "--refine",
               "--mask")
    assert run.returncode == 0, run.stderr
    webp = Image.open(out / "chelsea.webp")
    assert webp.format == "WEBP" and webp.mode == "RGBA" and webp.size == (451, 300)
    # --refine re-estimates colours at soft edges: the output is the refined cut-out of the
    # written mask, not the plain one (lossless WebP; colours under alpha 0 are not kept).
    original = Image.open(ASSETS / "chelsea.jpg").convert("RGB")
    mask = Image.open(out / "chelsea_mask.webp").convert("L")
    got = np.asarray(webp, dtype=int)
    refined, plain = (np.asarray(f(original, mask), dtype=int) for f in (refine_cutout, cutout))
    seen = got[..., 3] > 0
    assert np.array_equal(got[..., 3], np.asarray(mask))
    assert np.array_equal(got[seen], refined[seen])
    assert not np.array_equal(refined[seen], plain[seen])
    run = rmbg("remove", photos / "coffee.jpg", "-o", out, "--model", "u2netp", "--background", "red")
    assert run.returncode == 0, run.stderr
    red = Image.open(out / "coffee.png")
    assert red.mode == "RGB" and red.getpixel((0, 0)) == (255, 0, 0)
    bad = rmbg("remove", photos / "coffee.jpg", "-o", tmp_path / "x", "--model", "u2netp", "--background", "nocolour")
    assert bad.returncode != 0 and "nocolour" in bad.stderr


def test_blur_and_image_backgrounds_and_max_pixels(photos, tmp_path):
    original = Image.open(ASSETS / "chelsea.jpg").convert("RGB")
    run = rmbg("remove", photos / "chelsea.jpg", "-o", tmp_path / "blur", "--model", "u2netp", "--background", "blur",
               "--mask")
    assert run.returncode == 0, run.stderr
    mask = Image.open(tmp_path / "blur" / "chelsea_mask.png")
    blurred = Image.open(tmp_path / "blur" / "chelsea.png")
    assert blurred.mode == "RGB"
    assert np.array_equal(np.asarray(blurred), np.asarray(replace_background(original, mask, "blur")))
    assert not np.array_equal(np.asarray(blurred), np.asarray(original))
    # An image file as the background; --max-pixels refuses the 512x512 astronaut (0.26 MP), not the cat (0.14 MP).
    backdrop = tmp_path / "backdrop.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(backdrop)
    run = rmbg("remove", photos / "chelsea.jpg", photos / "astronaut.jpg", "-o", tmp_path / "image", "--model",
               "u2netp", "--background", backdrop, "--max-pixels", "200000", "--mask")
    assert run.returncode == 1, run.stderr
    assert "astronaut.jpg" in run.stderr and "over the 0.2 MP limit" in run.stderr
    assert "1 written, 1 failed, 0 skipped" in run.stderr
    assert not (tmp_path / "image" / "astronaut.png").exists()
    composed = np.asarray(Image.open(tmp_path / "image" / "chelsea.png"))
    mask = np.asarray(Image.open(tmp_path / "image" / "chelsea_mask.png"))
    assert (mask == 0).any() and (composed[mask == 0] == [10, 200, 30]).all()
    assert np.array_equal(composed[mask == 255], np.asarray(original)[mask == 255])


def test_weights_file_and_compile(photos, tmp_path, lite_weights_file, lite_fixture_model):
    import torch

    torch._dynamo.reset()
    try:  # (batch 1: one graph to capture; test_batching compiles several)
        run = rmbg("remove", photos / "chelsea.jpg", photos / "coffee.jpg", "-o", tmp_path / "out", "--model",
                   "birefnet-lite", "--size", "256", "--weights", lite_weights_file, "--compile", "eager",
                   "--batch-size", "1", "--device", "cpu", "--dtype", "float32", "--mask", "-q")
    finally:
        torch._dynamo.reset()  # nothing compiled here stays in this process
    assert run.returncode == 0, run.stderr
    assert "[birefnet-lite] at 256x256, torch on cpu (float32, compiled)" in run.stderr
    from rmbg_demo.pipeline import RemovalPipeline

    pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                               input_size=(256, 256))
    for name in ("chelsea", "coffee"):  # the weights of the file, not anything else
        expected = np.asarray(pipeline(photos / f"{name}.jpg").mask, dtype=int)
        written = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"), dtype=int)
        assert expected.std() > 4 and np.abs(written - expected).max() <= 1, name


def test_a_device_that_cannot_be_used_is_a_clear_error(photos, tmp_path, lite_weights_file):
    # The weights file loads; moving the network to a device that is not there fails before any image.
    run = rmbg("remove", photos / "chelsea.jpg", "-o", tmp_path / "out", "--model", "birefnet-lite", "--weights",
               lite_weights_file, "--device", "cuda:99")
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def failing_onnx(path):
    """An ONNX graph that loads (an RGB image in, one map out) but fails on every run: it reshapes
    the whole picture into 100x100, which only a 100x100 picture fits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([-1, 1, 100, 100], np.int64), "shape")
    nodes = [helper.make_node("ReduceMean", ["input"], ["grey"], axes=[1], keepdims=1),
             helper.make_node("Reshape", ["grey", "shape"], ["output"])]
    graph = helper.make_graph(nodes, "failing",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 1, 100, 100])],
                              [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_an_inference_failure_is_reported_per_image(photos, tmp_path):
    run = rmbg("remove", photos / "chelsea.jpg", photos / "coffee.jpg", "-o", tmp_path / "out", "--model", "u2netp",
               "--weights", failing_onnx(tmp_path / "failing.onnx"))
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    for name in ("chelsea.jpg", "coffee.jpg"):
        assert f"{name}: onnxruntime could not run failing.onnx" in run.stderr
    assert "0 written, 2 failed, 0 skipped" in run.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_rmbg2_weights_file_is_a_clear_error(photos, tmp_path):
    run = rmbg("remove", photos / "chelsea.jpg", "-o", tmp_path, "--model", "rmbg-2.0",
               "--weights", tmp_path / "model.safetensors")
    assert run.returncode == 2
    assert "weights file not found" in run.stderr


def test_console_script_is_installed():
    exe = shutil.which("rmbg")
    assert exe, "`pip install .` (or -e .) gives the rmbg command"
    run = subprocess.run([exe, "models"], capture_output=True, text=True, timeout=120, env=hermetic_env())
    assert run.returncode == 0, run.stderr
    lines = {line.split()[0]: line for line in run.stdout.splitlines()}
    assert "| embedded" in lines["u2netp"]
    assert "downloads on first use (https://huggingface.co/briaai/RMBG-2.0, ~885 MB; gated" in lines["rmbg-2.0"]


def test_size_is_checked_and_said(photos, tmp_path):
    run = rmbg("remove", photos / "chelsea.jpg", "-o", tmp_path / "a", "--size", "500")
    assert run.returncode == 2 and "size '500': each side must be a multiple of 32 from 256 to 2048" in run.stderr
    run = rmbg("remove", photos / "chelsea.jpg", "-o", tmp_path / "b", "--model", "u2netp", "--size", "512x384")
    assert run.returncode == 2 and "this onnxruntime model runs at 320x320 only, not 512x384" in run.stderr
    run = rmbg("remove", photos / "chelsea.jpg", "-o", tmp_path / "c", "--model", "u2netp", "-q")
    assert run.returncode == 0 and "[u2netp] at 320x320" in run.stderr


def test_manifest_has_a_line_per_input_on_the_plain_path(photos, tmp_path):
    import json

    (photos / "broken.jpg").write_bytes(b"x")
    manifest = tmp_path / "run.jsonl"
    args = [photos / "chelsea.jpg", photos / "broken.jpg", "-o", tmp_path / "out", "--model", "u2netp", "-q",
            "--manifest", manifest]
    assert rmbg("remove", *args).returncode == 1
    assert rmbg("remove", *args).returncode == 1  # again: chelsea is kept, its line says skipped
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [(Path(r["input"]).name, r["skipped"], r["error"] is None) for r in lines] == [
        ("chelsea.jpg", False, True), ("broken.jpg", False, False),  # the first run
        ("chelsea.jpg", True, True), ("broken.jpg", False, False)]  # the second: the good one kept
    first = lines[0]
    assert first["model"] == "u2netp" and (first["width"], first["height"]) == (451, 300)
    assert first["outputs"] == [str(tmp_path / "out" / "chelsea.png")] and "not an image" in lines[1]["error"]


def test_hostile_files_are_each_a_manifest_line_and_the_run_goes_on(photos, tmp_path):
    """A crafted PNG whose text chunk inflates to 100 MB, a truncated WebP, a PNG with a broken chunk and
    an empty clip among good photos: each bad one is reported by name with its reason, every good one is
    written, every input has its manifest line (issue 26; the zTXt PNG used to stop the run, exit 2)."""
    from helpers import png_with_bad_crc, truncated_image, ztxt_bomb_png

    from rmbg_demo.manifest import read_manifest

    (photos / "a_bomb.png").write_bytes(ztxt_bomb_png())
    (photos / "b_cut.webp").write_bytes(truncated_image("WEBP"))
    (photos / "c_crc.png").write_bytes(png_with_bad_crc())
    (photos / "d_empty.mp4").write_bytes(b"")
    out, manifest = tmp_path / "out", tmp_path / "manifest.jsonl"
    run = rmbg("remove", photos, "-o", out, "--model", "u2netp", "--manifest", manifest, "-q")
    assert run.returncode == 1, run.stderr
    assert "3 written, 4 failed, 0 skipped" in run.stderr
    assert re.search(r"a_bomb.png.*text chunk inflates past", run.stderr)
    assert re.search(r"b_cut.webp.*truncated or corrupt", run.stderr)
    assert re.search(r"c_crc.png.*checksum is wrong", run.stderr)
    assert re.search(r"d_empty.mp4.*the file is empty", run.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "chelsea.png", "coffee.png"]
    records = {Path(r.input).name: r for r in read_manifest(manifest)}
    assert sorted(records) == sorted(p.name for p in photos.iterdir())
    assert all(records[name].error for name in ("a_bomb.png", "b_cut.webp", "c_crc.png", "d_empty.mp4"))


def test_a_rerun_asking_for_more_outputs_writes_only_the_missing_ones(photos, tmp_path):
    """First without --mask, then with it: the cut-out already there is kept byte for byte (a sentinel
    shows any rewrite), the mask is added; --overwrite replaces both. The plan is `outputs.plan_outputs`,
    which --ray shares."""
    out = tmp_path / "out"
    assert rmbg("remove", photos / "chelsea.jpg", "-o", out, "--model", "u2netp").returncode == 0
    (out / "chelsea.png").write_bytes(b"sentinel: must survive the rerun")
    run = rmbg("remove", photos / "chelsea.jpg", "-o", out, "--model", "u2netp", "--mask")
    assert run.returncode == 0 and "1 written, 0 failed, 0 skipped" in run.stderr
    assert (out / "chelsea.png").read_bytes() == b"sentinel: must survive the rerun"
    assert Image.open(out / "chelsea_mask.png").mode == "L"
    run = rmbg("remove", photos / "chelsea.jpg", "-o", out, "--model", "u2netp", "--mask")
    assert "0 written, 0 failed, 1 skipped" in run.stderr
    assert rmbg("remove", photos / "chelsea.jpg", "-o", out, "--model", "u2netp", "--mask",
                "--overwrite").returncode == 0
    assert Image.open(out / "chelsea.png").mode == "RGBA"
