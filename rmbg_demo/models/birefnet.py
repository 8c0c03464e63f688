"""BiRefNet (Zheng et al. 2024), the network behind BRIA's RMBG-2.0.

Configuration fixed to what RMBG-2.0 and the public BiRefNet checkpoints use: a Swin
backbone run on the input and on its half-size copy ('cat' multi-scale input), three
context skips into the deepest feature, one BasicDecBlk squeeze block, ASPPDeformable
attention in every decoder block, decoder input patches ('dec_ipt' split into channels)
and gradient-attention heads. Module names match the published checkpoints.

In eval mode `forward` returns four logit maps, coarse to full resolution (strides 32,
16, 8 and 1), as the published RMBG-2.0 code does; `model(x)[-1].sigmoid()` is the mask.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from . import swin
from .swin import SWIN_LARGE, SWIN_TINY, SwinConfig, SwinTransformer, fixed_sizes


@dataclass(frozen=True)
class BiRefNetConfig:
    backbone: SwinConfig
    decoder_inter_channels: int = 64
    aspp_channels: int = 256
    aspp_kernel_sizes: tuple[int, ...] = (1, 3, 7)
    gradient_channels: int = 16

    @property
    def encoder_channels(self) -> tuple[int, ...]:
        """Channels of x1..x4 after the multi-scale concatenation (each stage doubled)."""
        return tuple(2 * c for c in self.backbone.channels)


RMBG2_CONFIG = BiRefNetConfig(backbone=SWIN_LARGE)
BIREFNET_LITE_CONFIG = BiRefNetConfig(backbone=SWIN_TINY)


def deform_conv2d_sampled(x, offset, weight, mask, padding: int) -> torch.Tensor:
    """Modulated deformable convolution (stride 1, one offset group) as one `grid_sample` and one matmul.

    Computes what `torchvision.ops.deform_conv2d` computes; on the CPU it is 1.3-2.7x faster
    than torchvision's kernel (measured at the decoder's sizes), which spends its time filling
    and copying its column buffer.
    """
    c, h, w = fixed_sizes(x, 1, 2, 3)
    out_channels, _, kh, kw = fixed_sizes(weight, 0, 1, 2, 3)
    taps = kh * kw
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    tap_y = torch.arange(kh, device=x.device, dtype=x.dtype).repeat_interleave(kw).view(1, taps, 1, 1)
    tap_x = torch.arange(kw, device=x.device, dtype=x.dtype).repeat(kh).view(1, taps, 1, 1)
    offset = offset.view(-1, taps, 2, h, w)  # (dy, dx) per tap, as torchvision lays them out
    # Sampling positions in grid_sample's [-1, 1] (corners aligned: -1 is the first pixel's centre).
    grid_y = (ys - padding + tap_y + offset[:, :, 0]) * (2.0 / max(h - 1, 1)) - 1.0
    grid_x = (xs - padding + tap_x + offset[:, :, 1]) * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack([grid_x, grid_y], dim=-1).view(-1, taps * h, w, 2)
    # Zero padding: samples outside the image read zeros, as in DCN.
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    sampled = sampled.view(-1, c, taps, h, w).mul_(mask.view(-1, 1, taps, h, w))
    return torch.matmul(weight.reshape(out_channels, c * taps), sampled.view(-1, c * taps, h * w)).view(
        -1, out_channels, h, w)


class DeformableConv(nn.Module):
    """Modulated deformable convolution (DCNv2) with offsets and modulation predicted from the input.

    torchvision's kernel has no bfloat16 (and patchy float16) support, so it always
    computes in float32 and casts back. `use_torchvision`: torchvision's op on every device, not
    only off the CPU (`torchvision_deformable`).
    """

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.padding = kernel // 2
        self.use_torchvision = False
        self.offset_conv = nn.Conv2d(cin, 2 * kernel * kernel, kernel, padding=self.padding)
        self.modulator_conv = nn.Conv2d(cin, kernel * kernel, kernel, padding=self.padding)
        self.regular_conv = nn.Conv2d(cin, cout, kernel, padding=self.padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)
        modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
        with torch.autocast(device_type=x.device.type, enabled=False):
            args = (x.float(), offset.float(), self.regular_conv.weight.float())
            if x.device.type == "cpu" and not self.use_torchvision:
                out = deform_conv2d_sampled(*args, modulator.float(), self.padding)
            else:
                out = deform_conv2d(*args, padding=(self.padding, self.padding), mask=modulator.float())
        return out.to(x.dtype)


@contextlib.contextmanager
def torchvision_deformable(network: nn.Module) -> Iterator[nn.Module]:
    """The network with torchvision's deform_conv2d in every deformable convolution, for a graph converter that
    maps that op to a native one (OpenVINO's DeformableConvolution). The sampled form's grid_sample computes
    sampling positions in the graph's precision: in bfloat16 they are off by up to a pixel and a half at 1024,
    and RMBG-2.0's masks moved by 8/255 (OpenVINO bf16; 1/255 with the native op, bench/RESULTS.md)."""
    convs = [module for module in network.modules() if isinstance(module, DeformableConv)]
    before = [conv.use_torchvision for conv in convs]
    for conv in convs:
        conv.use_torchvision = True
    try:
        yield network
    finally:
        for conv, used in zip(convs, before):
            conv.use_torchvision = used


class ASPPBranch(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.atrous_conv = DeformableConv(cin, cout, kernel)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.atrous_conv(x)))


class ASPPDeformable(nn.Module):
    """Parallel deformable branches plus global context, fused by a 1x1 convolution."""

    def __init__(self, channels: int, inner: int, kernels: tuple[int, ...]):
        super().__init__()
        self.aspp1 = ASPPBranch(channels, inner, 1)
        self.aspp_deforms = nn.ModuleList(ASPPBranch(channels, inner, k) for k in kernels)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(inner * (2 + len(kernels)), channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x):
        branches = [self.aspp1(x), *(branch(x) for branch in self.aspp_deforms)]
        # Bilinear upsampling of a 1x1 map is a broadcast.
        pooled = self.global_avg_pool(x).expand_as(branches[0])
        return F.relu(self.bn1(self.conv1(torch.cat([*branches, pooled], dim=1))))


class BasicDecBlk(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: BiRefNetConfig):
        super().__init__()
        inter = cfg.decoder_inter_channels
        self.conv_in = nn.Conv2d(cin, inter, 3, padding=1)
        self.bn_in = nn.BatchNorm2d(inter)
        self.dec_att = ASPPDeformable(inter, cfg.aspp_channels, cfg.aspp_kernel_sizes)
        self.conv_out = nn.Conv2d(inter, cout, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn_out(self.conv_out(self.dec_att(F.relu(self.bn_in(self.conv_in(x))))))


class SimpleConvs(nn.Module):
    """Two 3x3 convolutions without activation: embeds the image patches for the decoder."""

    def __init__(self, cin: int, cout: int, inter: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inter, 3, padding=1)
        self.conv_out = nn.Conv2d(inter, cout, 3, padding=1)

    def forward(self, x):
        return self.conv_out(self.conv1(x))


class LateralBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, corners aligned (BiRefNet's choice everywhere); a no-op at the same size."""
    size = tuple(int(s) for s in size)
    if fixed_sizes(x, -2, -1) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def image_to_patch_channels(image: torch.Tensor, size) -> torch.Tensor:
    """Cut `image` into a grid of tiles of `size` and stack the tiles as channels.

    A (B, C, gh*h, gw*w) image becomes (B, C*gh*gw, h, w): one reshape, no Python loop.
    The order is RMBG-2.0's, whole tiles column by column (channel = (col * gh + row) * C + c);
    the `ipt_blk*` weights are tied to it.
    """
    c, height, width = fixed_sizes(image, 1, 2, 3)
    h, w = size
    gh, gw = height // h, width // w
    tiles = image[..., : gh * h, : gw * w].reshape(-1, c, gh, h, gw, w)
    return tiles.permute(0, 4, 2, 1, 3, 5).reshape(-1, c * gh * gw, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: BiRefNetConfig):
        super().__init__()
        self.cfg = cfg
        c4, c3, c2, c1 = reversed(cfg.encoder_channels)  # 3072, 1536, 768, 384 for Swin-L
        patch_out = [c // 8 for c in (c4, c3, c2, c1)]
        # Patch grids of 32, 16, 8, 4 and 1 per side carry 3 * grid² channels.
        self.ipt_blk5 = SimpleConvs(3 * 32**2, patch_out[0])
        self.ipt_blk4 = SimpleConvs(3 * 16**2, patch_out[0])
        self.ipt_blk3 = SimpleConvs(3 * 8**2, patch_out[1])
        self.ipt_blk2 = SimpleConvs(3 * 4**2, patch_out[2])
        self.ipt_blk1 = SimpleConvs(3, patch_out[3])
        self.decoder_block4 = BasicDecBlk(c4 + patch_out[0], c3, cfg)
        self.decoder_block3 = BasicDecBlk(c3 + patch_out[0], c2, cfg)
        self.decoder_block2 = BasicDecBlk(c2 + patch_out[1], c1, cfg)
        self.decoder_block1 = BasicDecBlk(c1 + patch_out[2], c1 // 2, cfg)
        self.conv_out1 = nn.Sequential(nn.Conv2d(c1 // 2 + patch_out[3], 1, 1))
        self.lateral_block4 = LateralBlock(c3, c3)
        self.lateral_block3 = LateralBlock(c2, c2)
        self.lateral_block2 = LateralBlock(c1, c1)
        self.conv_ms_spvn_4 = nn.Conv2d(c3, 1, 1)
        self.conv_ms_spvn_3 = nn.Conv2d(c2, 1, 1)
        self.conv_ms_spvn_2 = nn.Conv2d(c1, 1, 1)
        # Gradient-attention heads: a small conv stack whose sigmoid gates the decoder features.
        # `gdt_convs_pred_*` predict the gradient map in training only; kept so checkpoints load strictly.
        n = cfg.gradient_channels
        for i, c in ((4, c3), (3, c2), (2, c1)):
            gradient = nn.Sequential(nn.Conv2d(c, n, 3, padding=1), nn.BatchNorm2d(n), nn.ReLU())
            self.add_module(f"gdt_convs_{i}", gradient)
            self.add_module(f"gdt_convs_pred_{i}", nn.Sequential(nn.Conv2d(n, 1, 1)))
            self.add_module(f"gdt_convs_attn_{i}", nn.Sequential(nn.Conv2d(n, 1, 1)))

    def with_patches(self, features: torch.Tensor, image: torch.Tensor, block: SimpleConvs) -> torch.Tensor:
        size = fixed_sizes(features, -2, -1)
        patches = resize(image_to_patch_channels(image, size), size)
        return torch.cat([features, block(patches)], dim=1)

    def gate(self, x: torch.Tensor, level: int) -> torch.Tensor:
        hidden = getattr(self, f"gdt_convs_{level}")(x)
        return x * getattr(self, f"gdt_convs_attn_{level}")(hidden).sigmoid()

    def forward(self, image, x1, x2, x3, x4) -> list[torch.Tensor]:
        p4 = self.decoder_block4(self.with_patches(x4, image, self.ipt_blk5))
        m4 = self.conv_ms_spvn_4(p4)
        p4 = self.gate(p4, 4)
        p3 = resize(p4, x3.shape[-2:]) + self.lateral_block4(x3)
        p3 = self.decoder_block3(self.with_patches(p3, image, self.ipt_blk4))
        m3 = self.conv_ms_spvn_3(p3)
        p3 = self.gate(p3, 3)
        p2 = resize(p3, x2.shape[-2:]) + self.lateral_block3(x2)
        p2 = self.decoder_block2(self.with_patches(p2, image, self.ipt_blk3))
        m2 = self.conv_ms_spvn_2(p2)
        p2 = self.gate(p2, 2)
        p1 = resize(p2, x1.shape[-2:]) + self.lateral_block2(x1)
        p1 = self.decoder_block1(self.with_patches(p1, image, self.ipt_blk2))
        return [m4, m3, m2, self.full_resolution_logits(p1, image)]

    def full_resolution_logits(self, p1: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """`conv_out1(cat([resize(p1), ipt_blk1(image)]))`, the published head, rearranged.

        Every step after the last activation is linear, so the same map costs far less:
        the 1x1 projection is applied to p1 before the upsampling (bilinear weights sum to
        one, so the two commute) and folded into `ipt_blk1.conv_out` (a 3x3 convolution
        followed by a 1x1 one is a 3x3 one). This upsamples 1 channel instead of 192 and
        skips a 64->48 convolution at full resolution.
        """
        head = self.conv_out1[0]
        (c,) = fixed_sizes(p1, 1)
        to_logit_feat = head.weight[:, :c]
        to_logit_patch = head.weight[:, c:, 0, 0].float()  # (1, 48)
        block = self.ipt_blk1
        weight = torch.einsum("op,pikl->oikl", to_logit_patch, block.conv_out.weight.float()).to(image.dtype)
        bias = (to_logit_patch @ block.conv_out.bias.float() + head.bias.float()).to(image.dtype)
        # The patch grid at full resolution is 1x1: the patches are the image itself.
        patch_logits = F.conv2d(block.conv1(image), weight, bias, padding=block.conv_out.padding)
        return resize(F.conv2d(p1, to_logit_feat), image.shape[-2:]) + patch_logits


class BiRefNet(nn.Module):
    def __init__(self, cfg: BiRefNetConfig = RMBG2_CONFIG):
        super().__init__()
        self.cfg = cfg
        self.bb = SwinTransformer(cfg.backbone)
        c4 = cfg.encoder_channels[-1]
        context = sum(cfg.encoder_channels[:3])
        self.squeeze_module = nn.Sequential(BasicDecBlk(c4 + context, c4, cfg))
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = fixed_sizes(x, -2, -1)
        full = self.bb(x)
        half = self.bb(resize(x, (h // 2, w // 2)))
        x1, x2, x3, x4 = (torch.cat([f, resize(g, f.shape[-2:])], dim=1) for f, g in zip(full, half))
        # Context skips: the three shallower maps, resized onto the deepest one.
        size = x4.shape[-2:]
        x4 = torch.cat([resize(x1, size), resize(x2, size), resize(x3, size), x4], dim=1)
        return x1, x2, x3, x4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x1, x2, x3, x4 = self.encode(x)
        return self.decoder(x, x1, x2, x3, self.squeeze_module(x4))


def checkpoint_filter(state: dict, model: nn.Module) -> dict:
    """Published BiRefNet/RMBG-2.0 files load as they are; only the Swin backbone's derived
    buffers may be missing."""
    return swin.checkpoint_filter(state, model)
