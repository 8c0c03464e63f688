"""Finding, reading and checking a registered model's weights (generic: what is particular to
one network, such as derived buffers, is its `checkpoint_filter` in `rmbg_demo/models/`).

Sources, in order: the path given (a file, or a folder holding one); the model's environment
variable (`RMBG_WEIGHTS` for RMBG-2.0); the file an installed package ships (embedded models);
the Hugging Face cache; and only when a model is actually loaded, a download from the hub
(`HF_TOKEN`, `HF_HUB_OFFLINE`). Deciding what is available never touches the network. Only
tensors are read (safetensors, or `torch.load(weights_only=True)`): no code comes from a checkpoint.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
from torch import nn

from .models import ModelSpec, Runtime, build_model, get_spec

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# BatchNorm's step counter: unused in inference, and some checkpoints leave it out.
BATCHNORM_COUNTER = "num_batches_tracked"
# Prefixes that training wrappers (DDP, torch.compile, Lightning) put before the real names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


class WeightsError(RuntimeError):
    """The weights could not be found, fetched or matched to the network; the message says why."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _how_to_pass(spec: ModelSpec) -> str:
    env = f" or set {spec.env_weights}=FILE" if spec.env_weights else ""
    files = " / ".join(spec.hub_files)
    return (f"download {files} from {spec.page_url} on a machine with access, then pass "
            f"--weights FILE (weights= in Python){env}")


def weights_in_folder(folder: Path, spec: ModelSpec | None = None) -> Path:
    preferred = [folder / name for name in (spec.hub_files if spec else ())] + [folder / "model.safetensors"]
    for path in preferred:
        if path.is_file():
            return path
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not candidates:
        raise WeightsError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in folder {folder}")
    safetensors = [p for p in candidates if p.suffix == ".safetensors"]
    return (safetensors or candidates)[0]


def local_weights(path: str | os.PathLike, spec: ModelSpec | None = None) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        return weights_in_folder(path, spec)
    if path.is_file():
        return path
    raise WeightsError(f"weights file not found: {path}")


def cached_weights(spec: ModelSpec) -> Path | None:
    """The model's checkpoint in the local Hugging Face cache, or None. Never touches the network."""
    if not spec.hub_repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in spec.hub_files:
        found = try_to_load_from_cache(spec.hub_repo, filename, cache_dir=_hub_cache_dir())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One short connection attempt to the hub, no retries: without network, huggingface_hub
    would retry each file for tens of seconds before saying so."""
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def hub_weights(spec: ModelSpec) -> Path:
    """The model's checkpoint from the local cache, else downloaded from the Hugging Face hub."""
    cached = cached_weights(spec)
    if cached:
        return cached
    if _env_flag("HF_HUB_OFFLINE"):
        raise WeightsError(f"{spec.name} weights are not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                           f"{_how_to_pass(spec)}")
    if not hub_reachable():
        raise WeightsError(f"{spec.name} weights are not here and the Hugging Face hub cannot be reached "
                           f"(no network?): {_how_to_pass(spec)}")
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    size = f" (~{spec.download_mb} MB)" if spec.download_mb else ""
    log.warning("downloading %s weights from %s%s", spec.name, spec.page_url, size)
    last_error: Exception | None = None
    for filename in spec.hub_files:
        try:
            return Path(hf_hub_download(spec.hub_repo, filename, cache_dir=_hub_cache_dir(),
                                        token=os.environ.get("HF_TOKEN") or None))
        except hub_errors.GatedRepoError as exc:
            raise WeightsError(
                f"{spec.name} is gated on the Hugging Face hub: accept its licence at {spec.page_url}, "
                f"then set HF_TOKEN to a token of that account (or {_how_to_pass(spec)})"
            ) from exc
        except hub_errors.EntryNotFoundError as exc:
            last_error = exc
        except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as exc:
            raise WeightsError(f"{spec.hub_repo} not found on the Hugging Face hub ({exc.__class__.__name__})") from exc
        except (OSError, hub_errors.HfHubHTTPError) as exc:  # network dropped, proxy, timeouts
            last_error = exc
    raise WeightsError(f"could not download {spec.name} weights from the Hugging Face hub: "
                       f"{_how_to_pass(spec)}") from last_error


def local_source(spec: ModelSpec, weights: str | os.PathLike | None = None) -> Path | None:
    """Where the weights are on this machine (the path given, the model's environment variable,
    the embedded file, the Hugging Face cache), or None. Never touches the network."""
    if weights is not None:
        return local_weights(weights, spec)
    if spec.env_weights and os.environ.get(spec.env_weights):
        return local_weights(os.environ[spec.env_weights], spec)
    if spec.onnx_file is not None:
        try:
            return spec.onnx_file()
        except FileNotFoundError as exc:
            raise WeightsError(str(exc)) from exc
    return cached_weights(spec)


def resolve_weights(name: str, weights: str | os.PathLike | None = None) -> Path:
    """Where `name`'s weights are: on this machine (see `local_source`), else downloaded from the hub."""
    spec = get_spec(name)
    found = local_source(spec, weights)
    if found is not None:
        return found
    if spec.hub_repo is None:
        raise WeightsError(f"{spec.name} has no download source; pass a weights file")
    return hub_weights(spec)


def weights_available(name: str, weights: str | os.PathLike | None = None) -> bool:
    """True when `name` runs without a download: embedded, a local file, or the Hugging Face cache."""
    try:
        return local_source(get_spec(name), weights) is not None
    except WeightsError:
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a checkpoint at all
        raise WeightsError(f"cannot read weights from {path}: {exc}") from exc
    # Some trainers wrap the tensors: {"state_dict": {...}} or {"model": {...}}.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix ('module.', ...) when every key carries it and the bare names fit."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            bare = {k[len(prefix):]: v for k, v in state.items()}
            if len(expected & bare.keys()) > len(expected & state.keys()):
                state = bare
    return state


def _listing(label: str, items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {label}: {', '.join(items[:limit])}{more}"


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError listing missing, unexpected and mis-shaped keys (BatchNorm counters excepted)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(BATCHNORM_COUNTER)]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                 for k in state if k in own and state[k].shape != own[k].shape]
    problems = [_listing(label, items) for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if items]
    if problems:
        raise WeightsError(f"{source} does not fit the network: " + "; ".join(problems))


def load_model(name: str, weights: str | os.PathLike | None = None, device=None, dtype=None):
    """The PyTorch network registered as `name`, with its weights, in eval mode, on `device` in `dtype`."""
    spec = get_spec(name)
    if spec.runtime is not Runtime.TORCH:
        raise ValueError(f"{spec.name} is an {spec.runtime.value} model with no PyTorch network; "
                         f"run it with RemovalPipeline({spec.name!r})")
    path = resolve_weights(name, weights)
    if path.suffix == ".onnx":
        raise WeightsError(f"{path} is an ONNX file: run it with RemovalPipeline({spec.name!r}, weights=...) "
                           "(ONNX Runtime), not as a PyTorch network")
    with torch.device("meta"):  # no storage, no random initialisation: it took longer than reading the file
        model = build_model(name)
    state = strip_wrapper_prefixes(read_state_dict(path), set(model.state_dict()))
    state = spec.filter_checkpoint(state, model)
    check_state_dict(model, state, str(path))
    own = model.state_dict()
    # The network's own dtypes (float32 parameters, int64 buffers), whatever the file stored.
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False, assign=True)
    for module in model.modules():
        if getattr(module, BATCHNORM_COUNTER, None) is not None and module.num_batches_tracked.is_meta:
            module.num_batches_tracked = torch.zeros((), dtype=torch.long)
    leftover = [k for k, v in model.state_dict().items() if v.is_meta]
    if leftover:
        raise WeightsError(f"{path} leaves {_listing('tensors', leftover)} of {spec.name} unset")
    log.info("loaded %s from %s", spec.name, path)
    return model.to(device=device, dtype=dtype).eval()
