import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES / "rmbg2"))

import parity  # noqa: E402  (the published network's fixture helpers, copied from shared/rmbg2)

from rmbg_demo import build_model  # noqa: E402


def _fixture_model(name: str) -> torch.nn.Module:
    model = build_model(name)
    result = model.load_state_dict(parity.deterministic_state_dict(model), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("relative_position_index") for k in result.missing_keys)
    return model


@pytest.fixture(scope="session")
def rmbg2_fixture_model() -> torch.nn.Module:
    """RMBG-2.0's network with the parity fixture's deterministic weights (no download)."""
    return _fixture_model("rmbg-2.0")


@pytest.fixture(scope="session")
def lite_fixture_model() -> torch.nn.Module:
    return _fixture_model("birefnet-lite")


ASSETS = Path(__file__).resolve().parent.parent / "assets"


def composite_on_texture(texture: str, size=(640, 480), seed=0):
    """A coloured horse pasted on a tinted texture: (RGB image, true boolean mask)."""
    import numpy as np
    from PIL import Image

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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """`python app.py` in a subprocess, as a user starts it."""

    def __init__(self, *args, env=None):
        import os
        import subprocess
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.gradio_tmp = tempfile.mkdtemp(prefix="gradio-test-")
        # No weights for RMBG-2.0 here: the app must fall back to the embedded model on its own.
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": self.gradio_tmp,
                       "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": self.gradio_tmp, **(env or {})}
        environment.pop("RMBG_WEIGHTS", None)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent.parent / "app.py"), "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment)

    def wait(self, timeout=180):
        import time
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
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
        except Exception:
            self.process.kill()


@pytest.fixture(scope="session")
def app_server():
    server = AppServer("--allow-private-urls").wait()
    yield server
    server.stop()


class ImageServer:
    """A plain HTTP server on 127.0.0.1 serving the assets, for the URL tab."""

    def __init__(self):
        import threading
        from functools import partial
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(ASSETS)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture(scope="session")
def image_server():
    server = ImageServer()
    yield server
    server.stop()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge 1-bit image, followed by a tiny compressed block."""
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
