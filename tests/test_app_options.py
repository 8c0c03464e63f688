"""app.py's model options as a user passes them: --weights, --device, --dtype, --compile, through
a real app and gradio_client; the Compare tab with two different models."""
import numpy as np
import pytest
from gradio_client import Client, handle_file
from helpers import ASSETS
from PIL import Image

from rmbg_demo.pipeline import RemovalPipeline


@pytest.fixture(scope="module")
def server(compiled_app):
    """The app with the plug-in model lite-256 (BiRefNet lite at 256x256: quick on a CPU) as its
    model, from a weights file, compiled with the "eager" backend (inductor takes minutes here) for the
    batch sizes of --batch-size 2; started with the session (conftest.early_servers)."""
    yield compiled_app.wait(timeout=600)
    compiled_app.stop()


def test_the_app_runs_the_weights_file_compiled_on_the_device_and_dtype_asked(server, lite_fixture_model):
    client = Client(server.url, verbose=False)
    result = client.predict(handle_file(str(ASSETS / "chelsea.jpg")), api_name="/image")
    assert "[lite-256] at 256x256, torch on cpu (float32, compiled)" in result[4]
    assert "compiled (eager) for batches of 1/2" in server.output()  # warmed up before the page opened
    pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                               input_size=(256, 256))
    expected = np.asarray(pipeline(ASSETS / "chelsea.jpg").mask, dtype=int)
    assert expected.std() > 4
    assert np.abs(np.asarray(Image.open(result[2]), dtype=int) - expected).max() <= 1  # the file's weights


def test_compare_endpoint_runs_two_different_models(server):
    client = Client(server.url, verbose=False)
    gallery, info = client.predict(handle_file(str(ASSETS / "coffee.jpg")), ["lite-256", "u2netp"],
                                   api_name="/compare")
    assert len(gallery) == 2
    assert [item["caption"].split(":")[0] for item in gallery] == ["lite-256", "u2netp"]
    assert "[lite-256]" in info and "[u2netp]" in info
    cuts = [np.asarray(Image.open(item["image"]), dtype=int) for item in gallery]
    assert all(c.shape == (400, 600, 4) for c in cuts)
    assert np.abs(cuts[0][..., 3] - cuts[1][..., 3]).mean() > 5  # two models, two masks
