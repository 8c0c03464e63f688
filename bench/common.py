"""What every benchmark here shares: the network with the parity fixture's weights, device
names, and the one writer of bench/RESULTS.md."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rmbg2"))
RESULTS = ROOT / "bench" / "RESULTS.md"
OUT = ROOT / "bench" / "out"


def fixture_network(model: str, device=None, dtype=None) -> torch.nn.Module:
    """`model`'s network with the parity fixture's deterministic weights: timings do not depend
    on weight values, and no weights need downloading."""
    import parity

    from rmbg_demo import build_model

    network = build_model(model)
    network.load_state_dict(parity.deterministic_state_dict(network), strict=False)
    return network.to(device=device, dtype=dtype).eval()


def fixture_weights_file(model: str) -> Path:
    """The parity fixture's weights as a real .safetensors file, so loading is timed as users see it."""
    from safetensors.torch import save_file

    path = OUT / f"{model}-fixture.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(fixture_network(model).state_dict(), str(path))
    return path


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def report(text: str, append: bool = True) -> None:
    """Print a section and append it to bench/RESULTS.md (the one place figures are kept)."""
    print(text)
    if append:
        with open(RESULTS, "a") as results:
            results.write(text.rstrip("\n") + "\n\n")
