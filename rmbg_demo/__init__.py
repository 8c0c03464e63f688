"""rmbg-demo: BRIA's RMBG-2.0 background removal as a library, a CLI and a Gradio demo."""
from .models import REGISTRY, ModelSpec, build_model, get_spec, model_names
from .weights import WeightsError, load_model, resolve_weights, weights_available

__version__ = "0.1.0"

__all__ = [
    "REGISTRY", "ModelSpec", "WeightsError", "build_model", "get_spec", "load_model", "model_names",
    "resolve_weights", "weights_available",
]
