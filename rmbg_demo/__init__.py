"""rmbg-demo: BRIA's RMBG-2.0 background removal as a library, a CLI and a Gradio demo."""
from .models import REGISTRY, ModelSpec, build_model, get_spec, model_names
from .weights import WeightsError, load_model, resolve_weights, weights_available

__version__ = "0.1.0"

__all__ = [
    "REGISTRY", "ModelSpec", "RemovalOptions", "WeightsError", "build_model", "get_spec", "load_model", "model_names",
    "remove", "resolve_weights", "weights_available",
]


def __getattr__(name: str):
    """`remove` (rembg-style, one call) and `RemovalOptions`, imported on first use: `import rmbg_demo`
    stays light for the CLI's --help and the registry."""
    if name == "remove":
        from .pool import remove

        return remove
    if name == "RemovalOptions":
        from .request import RemovalOptions

        return RemovalOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
