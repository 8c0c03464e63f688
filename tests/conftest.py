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
