"""Finding and loading a registered model's weights.

Sources, in order: the path given (a file, or a folder holding one); the model's
environment variable (`RMBG_WEIGHTS` for RMBG-2.0); the Hugging Face hub through
`huggingface_hub` (its cache, `HF_TOKEN`, `HF_HUB_OFFLINE`). Only tensors are read
(safetensors, or `torch.load(weights_only=True)`): no code comes from a checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from .models import ModelSpec, build_model, get_spec

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Buffers the network derives itself; a checkpoint may carry them or not.
DERIVED_SUFFIXES = ("relative_position_index", "num_batches_tracked")
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


def hub_weights(spec: ModelSpec, *, local_only: bool = False) -> Path:
    """The model's checkpoint from the Hugging Face hub (or only its cache, with `local_only`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    offline = local_only or _env_flag("HF_HUB_OFFLINE")
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None
    )
    last_error: Exception | None = None
    for filename in spec.hub_files:
        try:
            return Path(hf_hub_download(spec.hub_repo, filename, cache_dir=cache_dir, local_files_only=offline,
                                        token=os.environ.get("HF_TOKEN") or None))
        except hub_errors.GatedRepoError as exc:
            raise WeightsError(
                f"{spec.name} is gated on the Hugging Face hub: accept its licence at {spec.page_url}, "
                f"then set HF_TOKEN to a token of that account (or {_how_to_pass(spec)})"
            ) from exc
        except hub_errors.EntryNotFoundError as exc:  # includes "not in the local cache"
            last_error = exc
        except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as exc:
            raise WeightsError(f"{spec.hub_repo} not found on the Hugging Face hub ({exc.__class__.__name__})") from exc
        except (OSError, hub_errors.HfHubHTTPError) as exc:  # no network, DNS, proxy, timeouts
            last_error = exc
    where = "the local Hugging Face cache (offline)" if offline else "the Hugging Face hub (no network?)"
    raise WeightsError(f"could not get {spec.name} weights from {where}: {_how_to_pass(spec)}") from last_error


def resolve_weights(name: str, weights: str | os.PathLike | None = None, *, local_only: bool = False) -> Path:
    """Where `name`'s weights are: the path given, its environment variable, else the hub."""
    spec = get_spec(name)
    if weights is not None:
        return local_weights(weights, spec)
    if spec.env_weights and os.environ.get(spec.env_weights):
        return local_weights(os.environ[spec.env_weights], spec)
    if spec.hub_repo is None:
        raise WeightsError(f"{spec.name} has no download source; pass a weights file")
    return hub_weights(spec, local_only=local_only)


def weights_available(name: str, weights: str | os.PathLike | None = None) -> bool:
    """True when `name` can be loaded without asking: a local file, the hub cache, or the hub with a token."""
    spec = get_spec(name)
    if spec.runtime == "onnx":
        return True
    token = bool(os.environ.get("HF_TOKEN")) and not _env_flag("HF_HUB_OFFLINE")
    try:
        resolve_weights(name, weights, local_only=not (token or not spec.gated))
        return True
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
    """Raise WeightsError listing missing, unexpected and mis-shaped keys (derived buffers excepted)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(DERIVED_SUFFIXES)]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                 for k in state if k in own and state[k].shape != own[k].shape]
    problems = [_listing(label, items) for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if items]
    if problems:
        raise WeightsError(f"{source} does not fit the network: " + "; ".join(problems))


def load_model(name: str, weights: str | os.PathLike | None = None, device=None, dtype=None):
    """The network registered as `name`, with its weights, in eval mode, on `device` in `dtype`."""
    spec = get_spec(name)
    if spec.runtime == "onnx":
        from .models.u2netp import U2NetPOnnx

        return U2NetPOnnx(weights)
    path = resolve_weights(name, weights)
    with torch.device("meta"):  # no storage, no random initialisation: it took longer than reading the file
        model = build_model(name)
    state = strip_wrapper_prefixes(read_state_dict(path), set(model.state_dict()))
    check_state_dict(model, state, str(path))
    own = model.state_dict()
    # The network's own dtypes (float32 parameters, int64 buffers), whatever the file stored.
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False, assign=True)
    derive_missing_buffers(model)
    log.info("loaded %s from %s", spec.name, path)
    return model.to(device=device, dtype=dtype).eval()


def derive_missing_buffers(model: nn.Module) -> None:
    """Compute the buffers a checkpoint may leave out (DERIVED_SUFFIXES), still empty after loading."""
    from .models.swin import relative_position_index

    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name == "relative_position_index":
                value = relative_position_index(math.isqrt(buffer.shape[0]))
            elif name == "num_batches_tracked":
                value = torch.zeros((), dtype=torch.long)
            else:
                raise WeightsError(f"buffer {name!r} of {type(module).__name__} is neither loaded nor derivable")
            setattr(module, name, value)
