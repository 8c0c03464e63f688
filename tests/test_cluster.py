"""`rmbg remove --ray` on a real local Ray (2 CPUs), against the plain CLI, on local files and on a real
S3-compatible server (moto in server mode on 127.0.0.1), with a model actor killed mid-job."""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import rmbg_in_process
from PIL import Image

from rmbg_demo import manifest as manifest_module
from rmbg_demo import storage
from rmbg_demo.cli import build_parser, split_ray_address
from rmbg_demo.cluster.job import parse_workers
from rmbg_demo.pipeline import RemovalPipeline

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (240, 200, 30), (200, 60, 200), (30, 200, 210)]


def photo(index: int, size=(64, 48)) -> Image.Image:
    """A coloured patch on a textured grey background: small, distinct per index."""
    width, height = size
    rng = np.random.default_rng(index)
    pixels = (rng.integers(90, 140, (height, width, 3))).astype(np.uint8)
    pixels[height // 5:height * 4 // 5, width // 4:width * 3 // 4] = COLOURS[index % len(COLOURS)]
    return Image.fromarray(pixels)


def make_photos(folder: Path, count: int, prefix="p") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:02d}.png" if i % 2 else folder / f"{prefix}{i:02d}.jpg"
        photo(i).save(path, quality=95) if path.suffix == ".jpg" else photo(i).save(path)
        paths.append(path)
    return paths


def ray_cli(*argv):
    """`rmbg remove ARGV` (with --ray among them) through the CLI's own main, in this process, on the tests'
    local Ray."""
    assert "--ray" in argv
    return rmbg_in_process("remove", *argv)


def plain_cli(*argv):
    """`rmbg remove ARGV` without --ray (helpers.rmbg_in_process: the command's own main, in this process)."""
    return rmbg_in_process("remove", *argv)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_same_outputs_as_the_plain_cli_a_bad_file_is_a_manifest_line_and_a_rerun_resumes(local_ray, tmp_path):
    inputs = make_photos(tmp_path / "in", 4)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header, then nothing
    common = ["--model", "u2netp", "--mask", "--batch-size", "2"]
    plain = plain_cli(tmp_path / "in", "-o", tmp_path / "plain", *common)
    assert plain.returncode == 1, plain.stderr

    run = ray_cli(tmp_path / "in", "-o", tmp_path / "ray", *common, "--ray")

    assert run.returncode == 1  # one input failed
    err = run.stderr
    assert "4 written, 1 failed, 0 skipped" in err and "images/s" in err and "network" in err
    assert files(tmp_path / "ray") == sorted(files(tmp_path / "plain") + ["manifest.jsonl"])  # no temp files
    for name in files(tmp_path / "plain"):
        assert np.array_equal(pixels(tmp_path / "ray" / name), pixels(tmp_path / "plain" / name)), name
    records = {Path(r.input).name: r for r in manifest_module.read_manifest(tmp_path / "ray" / "manifest.jsonl")}
    assert sorted(records) == sorted(p.name for p in (tmp_path / "in").iterdir())
    assert "broken.png" in records and records["broken.png"].error and not records["broken.png"].outputs
    good = records[inputs[0].name]
    assert good.error is None and good.model == "u2netp" and (good.width, good.height) == (64, 48)
    assert sorted(Path(p).name for p in good.outputs) == ["p00.png", "p00_mask.png"]

    # A crash left one cut-out missing: the rerun writes it and touches nothing else.
    (tmp_path / "ray" / "p03.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("*.png")}
    run = ray_cli(tmp_path / "in", "-o", tmp_path / "ray", *common, "--ray")
    assert run.returncode == 1
    assert "1 written, 1 failed, 3 skipped" in run.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("*.png")}
    assert {k for k in after if before.get(k) != after[k]} == {"p03.png"}
    assert np.array_equal(pixels(tmp_path / "ray" / "p03.png"), pixels(tmp_path / "plain" / "p03.png"))
    latest = {Path(r.input).name: r for r in manifest_module.read_manifest(tmp_path / "ray" / "manifest.jsonl")}
    assert latest["p03.png"].outputs and not latest["p03.png"].skipped
    assert latest["p00.jpg"].skipped


def s3_filesystem():
    from pyarrow import fs

    # The endpoint and keys come from the environment, as in the job.
    return fs.FileSystem.from_uri("s3://photos?allow_bucket_creation=true&allow_delayed_open=true")[0]


def test_reads_and_writes_object_storage(local_ray, s3_server, tmp_path):
    s3 = s3_filesystem()
    s3.create_dir("photos")
    local = make_photos(tmp_path / "in", 3)
    for path in local:
        with s3.open_output_stream(f"photos/in/{path.name}") as stream:
            stream.write(path.read_bytes())
    with s3.open_output_stream("photos/in/readme.txt") as stream:
        stream.write(b"not an image, and not listed")

    run = ray_cli("s3://photos/in/*", "-o", "s3://photos/out", "--model", "u2netp", "--mask", "--ray", "-q")

    assert run.returncode == 0, run.stderr
    from pyarrow import fs

    listing = {info.base_name for info in s3.get_file_info(fs.FileSelector("photos/out"))}
    assert listing == {f"p0{i}{s}.png" for i in range(3) for s in ("", "_mask")} | {"manifest.jsonl"}
    # What the plain CLI writes, made by the calls it makes (the first test holds the two CLIs together).
    pipeline = RemovalPipeline("u2netp")
    for path in local:
        result = pipeline(path)
        for name, image in ((f"{path.stem}.png", result.cutout()), (f"{path.stem}_mask.png", result.mask)):
            got = Image.open(io.BytesIO(storage.read_bytes(f"s3://photos/out/{name}")))
            assert np.array_equal(np.asarray(got), np.asarray(image)), name
    lines = storage.read_bytes("s3://photos/out/manifest.jsonl").decode().splitlines()
    assert sorted(json.loads(line)["input"] for line in lines) == [f"s3://photos/in/{p.name}" for p in local]


def actor_pids(marker: str = "NetworkStage") -> set[int]:
    """PIDs of Ray worker processes running our model actor (Ray titles them ray::...NetworkStage...)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and marker in title:
            found.add(int(entry.name))
    return found


def test_a_killed_model_worker_is_replaced_and_every_output_is_written_once(local_ray, tmp_path):
    make_photos(tmp_path / "in", 16)
    out = tmp_path / "out"
    argv = (tmp_path / "in", "-o", out, "--model", "u2netp", "--mask", "--batch-size", "2", "--workers", "1",
            "--ray", "-q")
    result = {}
    job = threading.Thread(target=lambda: result.setdefault("code", ray_cli(*argv).returncode))
    job.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        pids = actor_pids()
        if pids and out.is_dir() and any(out.glob("*_mask.png")):  # the actor is mid-job
            killed = min(pids)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    assert killed is not None, "the job ended before its model actor could be killed"
    assert job.is_alive()
    job.join(300)

    assert result.get("code") == 0
    names = files(out)
    assert names == sorted([f"p{i:02d}{s}.png" for i in range(16) for s in ("", "_mask")] + ["manifest.jsonl"])
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(Path(r["input"]).name for r in lines) == sorted(p.name for p in (tmp_path / "in").iterdir())
    assert all(r["error"] is None for r in lines)  # each input once, none failed
    for i in (0, 15):
        assert Image.open(out / f"p{i:02d}.png").size == (64, 48)


def test_missing_ray_is_a_clear_error_naming_the_extra(tmp_path):
    make_photos(tmp_path / "in", 1)
    code = ("import sys; sys.modules['ray'] = None\n"
            "from rmbg_demo.cli import main\n"
            f"sys.exit(main(['remove', {str(tmp_path / 'in')!r}, '-o', {str(tmp_path / 'out')!r}, '--model', "
            "'u2netp', '--ray']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1], check=False)
    assert run.returncode == 2
    assert "pip install 'rmbg-demo[ray]'" in run.stderr
    assert not (tmp_path / "out").exists()


def test_workers_flag_and_the_optional_address():
    assert parse_workers("3", 0) == (3, 3)
    assert parse_workers("1,4", 0) == (1, 4)
    assert parse_workers(None, 0) == (1, 1)
    assert parse_workers(None, 4) == (1, 4)
    for bad in ("0", "4,2", "x", "1,2,3"):
        with pytest.raises(ValueError, match="--workers"):
            parse_workers(bad, 0)
    args = build_parser().parse_args(["remove", "-o", "out", "--ray", "photo.jpg", "more.jpg"])
    split_ray_address(args)
    assert (args.ray, args.inputs) == ("", ["photo.jpg", "more.jpg"])  # a file after --ray is an input
    for address in ("auto", "ray://head:10001", "10.0.0.5:6379"):
        args = build_parser().parse_args(["remove", "a.jpg", "-o", "out", "--ray", address])
        split_ray_address(args)
        assert (args.ray, args.inputs) == (address, ["a.jpg"])


def test_manifest_keeps_the_latest_record_per_input_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    with manifest_module.ManifestWriter(path) as writer:
        writer.write(manifest_module.ManifestRecord("a.jpg", error="not an image"))
        writer.write(manifest_module.ManifestRecord("b.jpg", ["out/b.png"], "u2netp", 4, 3, 0.5))
        writer.write(manifest_module.ManifestRecord("a.jpg", ["out/a.png"], "u2netp", 4, 3, 0.25))
        assert (writer.count, writer.failed) == (3, 1)
    with open(path, "a") as handle:
        handle.write('{"input": "c.jpg", "outp')  # the writer was killed mid-line
    latest = {r.input: r for r in manifest_module.read_manifest(path)}
    assert sorted(latest) == ["a.jpg", "b.jpg"]
    assert latest["a.jpg"].ok and latest["a.jpg"].outputs == ["out/a.png"]
    assert len(manifest_module.read_manifest(path, latest=False)) == 3


def test_review_and_cascade_route_the_same_rows_as_the_plain_cli(local_ray, tmp_path, lite_weights_file):
    """--review-below and --escalate-to with --ray: the second model's actors get only the escalated row,
    its answer is kept and, under the review threshold, lands in OUT/review/, as the plain command does it."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg"):  # u2netp: 0.93, 0.97, 0.80
        (folder / name).write_bytes((Path(__file__).parents[1] / "assets" / name).read_bytes())
    flags = ["--model", "u2netp", "--escalate-to", "birefnet-lite", "--escalate-below", "0.85", "--escalate-weights",
             lite_weights_file, "--escalate-size", "256", "--dtype", "float32", "--review-below", "0.9"]
    plain = plain_cli(folder, "-o", tmp_path / "plain", *flags, "-q")
    run = ray_cli(folder, "-o", tmp_path / "ray", *flags, "--ray", "-q")
    assert plain.returncode == 0 and run.returncode == 0, run.stderr
    assert "escalating 1 images to model birefnet-lite at 256x256" in run.stderr
    assert "1 under --review-below 0.9" in run.stderr
    assert files(tmp_path / "ray" / "review") == files(tmp_path / "plain" / "review") == ["chelsea.png"]
    # The network's float32 sums run in another order with a Ray actor's one thread than with the plain
    # command's two: on an AMX Xeon 8 alpha values of this PyTorch model differ by 1/255 (none with one thread).
    ray_pixels, plain_pixels = (pixels(tmp_path / way / "review" / "chelsea.png") for way in ("ray", "plain"))
    assert np.abs(ray_pixels - plain_pixels).max() <= 1
    records = {Path(r.input).name: r for r in manifest_module.read_manifest(tmp_path / "ray" / "manifest.jsonl")}
    assert records["chelsea.jpg"].model == "birefnet-lite" and records["chelsea.jpg"].escalated_from == "u2netp"
    assert records["chelsea.jpg"].review and records["chelsea.jpg"].first_confidence < 0.85
    assert records["coffee.jpg"].model == "u2netp" and records["coffee.jpg"].confidence >= 0.9


def test_processes_a_local_ray_leaves_behind_are_waited_for_then_stopped():
    """Ray's dashboard and runtime-env agents sometimes outlived `rmbg serve`/--ray by minutes, ignoring
    SIGTERM: after its shutdown, every process the local instance started is waited for, then killed."""
    from rmbg_demo.cluster.runtime import _alive, _descendants, shutdown_local

    others = _descendants(os.getpid())  # the session's servers: not Ray's, never touched
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                                 "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on

    class LocalRay:  # what ray.shutdown() leaves: a child that ignores it
        @staticmethod
        def shutdown():
            stubborn.terminate()

    try:
        shutdown_local(LocalRay, grace=1.0, exclude=others)
        stubborn.wait(timeout=10)
        assert others <= _descendants(os.getpid())  # still running
        assert not _alive(stubborn.pid)
        assert stubborn.returncode == -signal.SIGKILL
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
