import pytest
import torch
from helpers import AppServer, ImageServer, fixture_model


@pytest.fixture(scope="session")
def rmbg2_fixture_model() -> torch.nn.Module:
    """RMBG-2.0's network with the parity fixture's deterministic weights (no download)."""
    return fixture_model("rmbg-2.0")


@pytest.fixture(scope="session")
def lite_fixture_model() -> torch.nn.Module:
    return fixture_model("birefnet-lite")


@pytest.fixture(scope="session")
def app_server():
    server = AppServer("--allow-private-urls").wait()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_server():
    server = ImageServer()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def restore_torch_settings():
    """Tests may change process-wide torch settings; each gets them back as they were."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark = saved[1]
    torch.set_num_threads(saved[2])
