"""Helpers shared by the tests: real images made from the assets, the app as a user starts it,
local HTTP servers. Fixtures that use them live in conftest.py."""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES / "rmbg2"))

import parity  # noqa: E402  (the published network's fixture helpers, copied from shared/rmbg2)

from rmbg_demo import build_model  # noqa: E402

# Variables through which a developer's own machine could leak weights, tokens or a hub into a test.
LEAKY_VARIABLES = ("RMBG_WEIGHTS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HOME",
                   "HF_HUB_CACHE")


# One OpenVINO cache for a test session and the processes it starts (a network is converted once), not the
# developer's.
OPENVINO_CACHE = tempfile.mkdtemp(prefix="openvino-cache-")


def fixture_model(name: str) -> torch.nn.Module:
    """`name`'s network with the parity fixture's deterministic weights (no download)."""
    model = build_model(name)
    result = model.load_state_dict(parity.deterministic_state_dict(model), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("relative_position_index") for k in result.missing_keys)
    return model


def composite_on_texture(texture: str, size=(640, 480), seed=0):
    """A coloured horse pasted on a tinted texture: (RGB image, true boolean mask)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ground = Image.open(ASSETS / f"{texture}.jpg").convert("L").resize(size)
    tint = np.array([0.55, 0.75, 0.5]) if texture == "grass" else np.array([0.8, 0.7, 0.6])
    background = (np.asarray(ground, dtype=float)[..., None] * tint).astype(np.uint8)
    horse = Image.open(ASSETS / "horse_mask.png").convert("L")
    scale = 0.75
    horse = horse.resize((int(horse.width * scale * width / 640), int(horse.height * scale * width / 640)))
    left = int(rng.integers(0, width - horse.width))
    top = int(rng.integers(0, height - horse.height))
    truth = np.zeros((height, width), dtype=bool)
    truth[top:top + horse.height, left:left + horse.width] = np.asarray(horse) >= 128
    colour = np.array([150, 75, 40], dtype=np.uint8)  # a chestnut horse
    image = np.where(truth[..., None], colour, background)
    return Image.fromarray(image.astype(np.uint8)), truth


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload and the CRC of type and payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge 1-bit image, followed by a tiny compressed block."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 8)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


# Hostile image files, each made from a small good one. PNG layout: 8-byte signature, then the IHDR chunk
# (25 bytes) ends at byte 33; the pixel data (IDAT) follows.
PNG_AFTER_IHDR = 33


def small_image_bytes(fmt: str = "PNG", size=(64, 48), **options) -> bytes:
    """A real, valid `fmt` file (Pillow's format name) of a smooth colour gradient: the good file
    the hostile ones are made from."""
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, fmt, **options)
    return buffer.getvalue()


@functools.lru_cache(maxsize=4)
def zeros_zlib(size_mib: int) -> bytes:
    """A zlib stream that inflates to `size_mib` MiB of zeros, about 1000x smaller, made without ever
    holding the zeros: one independently compressed MiB (a full flush ends it on a byte boundary and
    resets the compressor), repeated, then the end of the stream and the Adler-32 of it all."""
    mib = bytes(1 << 20)
    compressor = zlib.compressobj(9)
    head = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)  # zlib header + the first MiB
    one = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)  # a MiB that stands on its own
    tail = compressor.flush(zlib.Z_FINISH)[:-4]  # the final (empty) block, without the checksum
    adler = 1
    for _ in range(size_mib):
        adler = zlib.adler32(mib, adler)
    return head + one * (size_mib - 1) + tail + struct.pack(">I", adler)


def ztxt_bomb_png(inflated_mib: int = 100, *, after_pixels: bool = False) -> bytes:
    """A valid small PNG with a zTXt text chunk whose text inflates to `inflated_mib` MiB (the file is
    about 1000x smaller), placed before the pixel data (Pillow meets it in Image.open) or after it
    (at .load())."""
    png = small_image_bytes("PNG")
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + zeros_zlib(inflated_mib))
    if after_pixels:
        return png[:-12] + ztxt + png[-12:]  # the IEND chunk is the last 12 bytes
    return png[:PNG_AFTER_IHDR] + ztxt + png[PNG_AFTER_IHDR:]


def png_with_bad_crc() -> bytes:
    """A small PNG with a tEXt chunk before the pixel data whose CRC does not match its content."""
    png = small_image_bytes("PNG")
    text = bytearray(png_chunk(b"tEXt", b"Comment\x00hello"))
    text[-1] ^= 0xFF
    return png[:PNG_AFTER_IHDR] + bytes(text) + png[PNG_AFTER_IHDR:]


def png_with_corrupt_idat() -> bytes:
    """A small PNG whose pixel data (IDAT, CRC intact) is not a zlib stream."""
    png = small_image_bytes("PNG")
    start = png.index(b"IDAT")
    length = struct.unpack(">I", png[start - 4:start])[0]
    payload = bytes(length)  # zeros: "unrecognized data stream contents" to zlib
    return png[:start - 4] + png_chunk(b"IDAT", payload) + png[start + 4 + length + 4:]


def truncated_image(fmt: str, keep: float = 0.5) -> bytes:
    """The first `keep` of a small `fmt` file, as an interrupted download leaves it."""
    data = small_image_bytes(fmt)
    return data[:int(len(data) * keep)]


def image_with_broken_header(fmt: str) -> bytes:
    """A small GIF, BMP or TIFF whose header is damaged (its signature intact): a GIF whose image
    descriptor states an impossible LZW code size (12; at most 8 is valid), a BMP with an unknown
    info-header size, a TIFF whose first directory lies past the end of the file."""
    data = bytearray(small_image_bytes(fmt))
    if fmt == "GIF":
        flags = data[10]  # the global colour table, if any, follows the 13-byte screen descriptor
        descriptor = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        assert data[descriptor:descriptor + 1] == b",", "the small GIF starts with its image"
        data[descriptor + 10] = 12  # after the separator, 4 position/size words and the flags byte
    elif fmt == "BMP":
        data[14:18] = struct.pack("<I", 7)
    elif fmt == "TIFF":
        data[4:8] = struct.pack("<I", 1 << 30)
    else:
        raise ValueError(f"no broken header for {fmt}")
    return bytes(data)


CLOSED_HUB = "http://127.0.0.1:9"  # the discard port, closed here: a hub that cannot be reached


def hermetic_env(**extra: str) -> dict[str, str]:
    """This process's environment without the developer's weights, tokens or hub settings, with an
    empty Hugging Face cache of its own; `extra` on top. Offline is not set: tests run the app
    as a user starts it."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_VARIABLES}
    # HF_HOME too: huggingface_hub reads a stored token from $HF_HOME/token (~/.cache/huggingface).
    env.update({"HF_HOME": tempfile.mkdtemp(prefix="hf-home-"), "HF_HUB_CACHE": tempfile.mkdtemp(prefix="hf-cache-"),
                "RMBG_OPENVINO_CACHE": OPENVINO_CACHE,
                "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_ENDPOINT": CLOSED_HUB})
    env.update(extra)
    return env


def free_port() -> int:
    """A port free now; another process may take it before it is bound again (AppServer retries)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hub_cache_with(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """The layout huggingface_hub writes for `repo` (refs/main -> snapshots/<commit>/<file>),
    holding `files` (name in the repo -> a local file, linked): a model 'already downloaded'."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        os.symlink(path, snapshot / name)
    return cache


# A model registered by a plug-in: BiRefNet lite at 256x256 (the registered birefnet-lite runs at
# 1024x1024: a minute of CPU per image here), weights from --weights or LITE_256_WEIGHTS.
LITE_256_PLUGIN = """
from rmbg_demo.models import ModelSpec, register
from rmbg_demo.models.birefnet import BIREFNET_LITE_CONFIG, BiRefNet, checkpoint_filter

register(ModelSpec(name="lite-256", title="BiRefNet lite at 256", licence="MIT", licence_url="https://example.org",
                   input_size=(256, 256), builder=lambda: BiRefNet(BIREFNET_LITE_CONFIG),
                   checkpoint_filter=checkpoint_filter, env_weights="LITE_256_WEIGHTS"))
"""


def run_with_lite_256(folder: Path, *args, env=None) -> subprocess.CompletedProcess:
    """`rmbg ARGS` in a hermetic subprocess where the plug-in model `lite-256` is registered."""
    (folder / "lite256.py").write_text(LITE_256_PLUGIN)
    code = f"import sys, lite256\nfrom rmbg_demo.cli import main\nsys.exit(main({[str(a) for a in args]!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=hermetic_env(PYTHONPATH=f"{folder}:{ROOT}", **(env or {})))


def rmbg_in_process(*args) -> subprocess.CompletedProcess:
    """`rmbg ARGS` through the CLI's own `main` in this (hermetic) process: the same parsing, files,
    messages and exit code as the command, without starting an interpreter and importing torch
    (4-5 s a run here). Tests about the process itself (the console script, an uncaught failure,
    environment read at import) run a subprocess instead."""
    from rmbg_demo.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()  # pytest's handlers would swallow what the CLI's basicConfig sends to stderr
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(arg) for arg in args])
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return subprocess.CompletedProcess(["rmbg", *map(str, args)], code, out.getvalue(), err.getvalue())


def compiled_lite_app(folder: Path, weights: Path) -> AppServer:
    """`python app.py --model lite-256 --weights FILE --compile eager --batch-size 2` (lite-256: a plug-in
    model, BiRefNet lite at 256x256), started; `.wait()` for it. The "eager" backend runs dynamo's
    capture without inductor's code generation (minutes per graph here)."""
    (folder / "lite256.py").write_text(LITE_256_PLUGIN)
    launcher = folder / "app_with_lite_256.py"
    launcher.write_text(f"import runpy, sys\nimport lite256\nsys.argv[0] = {str(ROOT / 'app.py')!r}\n"
                        f"runpy.run_path({str(ROOT / 'app.py')!r}, run_name='__main__')\n")
    return AppServer("--model", "lite-256", "--weights", str(weights), "--device", "cpu", "--dtype", "float32",
                     "--compile", "eager", "--batch-size", "2", env={"PYTHONPATH": f"{folder}:{ROOT}"}, script=launcher)


class CountingHub:
    """A stand-in for the Hugging Face hub on 127.0.0.1 that answers 404 and counts requests:
    an app pointed at it (HF_ENDPOINT) that asks the hub anything shows up in `requests`; one
    that merely connects (a reachability probe) shows up in `connections`."""

    def __init__(self):
        hub = self
        self.requests: list[str] = []
        self.connections = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(f"{self.command} {self.path}")
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def verify_request(self, request, client_address):
                hub.connections += 1
                return True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


class AppServer:
    """`python app.py` in a subprocess, as a user starts it: no HF_HUB_OFFLINE, no weights, no
    token, an empty Hugging Face cache, and `hub_url` (default: the closed CLOSED_HUB, no network) as the hub."""

    def __init__(self, *args, env=None, hub_url: str | None = None, script: Path | None = None):
        self.args, self.extra_env, self.script = args, env or {}, script or ROOT / "app.py"
        self.hub_url = hub_url or CLOSED_HUB
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.gradio_tmp = tempfile.mkdtemp(prefix="gradio-test-")
        self.start()

    def start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        environment = hermetic_env(**{"GRADIO_TEMP_DIR": self.gradio_tmp, "HF_ENDPOINT": self.hub_url, **self.extra_env})
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, str(self.script), "--port", str(self.port), *self.args],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=environment)

    def wait(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                if "Cannot find empty port" in self.output() or "address already in use" in self.output():
                    self.start()  # another process took the port between free_port() and the bind: retry
                    continue
                raise RuntimeError(f"app exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - self.started
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"app did not answer in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


class ImageServer:
    """A plain HTTP server on 127.0.0.1 serving the assets, for the URL tab."""

    def __init__(self):
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(ASSETS)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def _s15(value: float) -> bytes:
    """An ICC s15Fixed16Number."""
    return struct.pack(">i", round(value * 65536))


def _icc_description(text: bytes) -> bytes:
    """A v2 textDescriptionType: ASCII, then empty Unicode and ScriptCode parts."""
    return b"desc" + b"\0" * 4 + struct.pack(">I", len(text) + 1) + text + b"\0" + b"\0" * 8 + b"\0" * 3 + b"\0" * 67


def _icc_xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def assemble_icc_profile(device_class: bytes, colour_space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A v2.1 ICC profile: the 128-byte header (D50 illuminant), the tag table, the tags 4-byte aligned."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + device_class + colour_space + pcs
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + b"\0" * 4 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def display_p3_profile() -> bytes:
    """A Display P3 ICC profile (v2, matrix/TRC: P3 primaries adapted to D50, gamma 2.2), built here: no
    profile file ships on these machines and littlecms creates only sRGB among RGB spaces."""
    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", int(2.2 * 256)) + b"\0\0"
    tags = [(b"desc", _icc_description(b"Display P3 (rmbg-demo tests)")), (b"wtpt", _icc_xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", _icc_xyz(0.5151, 0.2412, -0.0011)), (b"gXYZ", _icc_xyz(0.2920, 0.6922, 0.0419)),
            (b"bXYZ", _icc_xyz(0.1571, 0.0666, 0.7841)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    return assemble_icc_profile(b"mntr", b"RGB ", b"XYZ ", tags)


# The test CMYK profile's own colours (Lab, D50): full cyan prints a dark teal and full magenta a
# crimson, far from the naive 255 - x conversion's pure cyan (0, 255, 255) and magenta (255, 0, 255).
PAPER_LAB, CYAN_INK_LAB, MAGENTA_INK_LAB = (96.0, 0.0, 0.0), (42.0, -30.0, -20.0), (40.0, 55.0, 20.0)


def _lut16(inputs: int, outputs: int, clut: list[tuple[float, ...]]) -> bytes:
    """An ICC lut16Type ('mft2'): identity matrix, 2-entry identity input and output curves, a CLUT of 2 grid
    points per input (the first input varies slowest) with `clut`'s values in [0, 1] per output."""
    identity = b"".join(_s15(1.0 if row == column else 0.0) for row in range(3) for column in range(3))
    curves = struct.pack(">2H", 0, 65535)
    body = b"mft2" + b"\0" * 4 + bytes([inputs, outputs, 2, 0]) + identity + struct.pack(">HH", 2, 2)
    body += curves * inputs
    body += b"".join(struct.pack(">H", round(min(1.0, max(0.0, value)) * 65535)) for point in clut for value in point)
    return body + curves * outputs


def _lab16(lab: tuple[float, float, float]) -> tuple[float, float, float]:
    """Lab as a v2 16-bit PCS value, over 65535: L* 0-100 -> 0-0xFF00, a* and b* -128-128 -> 0-0xFFFF."""
    lightness, a, b = lab
    return (lightness * 0xFF00 / 100 / 65535, (a + 128) * 256 / 65535, (b + 128) * 256 / 65535)


def tinted_cmyk_profile() -> bytes:
    """A small CMYK output ('prtr') ICC profile, v2, Lab PCS, with lut16 A2B0/B2A0 tags. Its A2B0 is simple
    and deliberately unlike the naive inversion: cyan and magenta print `CYAN_INK_LAB` and `MAGENTA_INK_LAB`
    on `PAPER_LAB` (mixed linearly in Lab), yellow shifts b* up, black darkens everything. Built here: no
    CMYK profile ships on these machines and littlecms cannot create one."""
    points = []
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    lab = [paper + c * (cyan - paper) + m * (magenta - paper)
                           for paper, cyan, magenta in zip(PAPER_LAB, CYAN_INK_LAB, MAGENTA_INK_LAB)]
                    lab = [lab[0] * (1 - 0.1 * y), lab[1], lab[2] + 70 * y]
                    points.append(_lab16((max(0.0, lab[0]) * (1 - 0.85 * k), lab[1] * (1 - k), lab[2] * (1 - k))))
    a2b0 = _lut16(4, 3, points)
    # B2A0 (Lab -> ink), needed for a valid output profile: a rough inverse; the tests read only A2B0
    inks = [(1 - lightness, a * 0.5, b * 0.5, 0.5 * (1 - lightness)) for lightness in (0, 1) for a in (0, 1)
            for b in (0, 1)]
    b2a0 = _lut16(3, 4, inks)
    tags = [(b"desc", _icc_description(b"Tinted CMYK (rmbg-demo tests)")), (b"wtpt", _icc_xyz(0.9642, 1.0, 0.8249)),
            (b"A2B0", a2b0), (b"B2A0", b2a0)]
    return assemble_icc_profile(b"prtr", b"CMYK", b"Lab ", tags)
