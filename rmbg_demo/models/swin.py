"""Swin Transformer v1 backbone (Liu et al. 2021), as BiRefNet uses it.

Parameter names follow the published BiRefNet / RMBG-2.0 checkpoints (`patch_embed`,
`layers.N.blocks.M.attn.qkv`, `norm0..norm3`, ...), so their weights load unchanged.
Features stay in (B, H, W, C) layout inside a stage; window attention goes through
`scaled_dot_product_attention` with the relative-position bias (and, in shifted blocks,
the cyclic-shift mask) as an additive mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The published code masks cross-region pairs with -100 before the softmax; a finite
# value keeps half precision free of inf - inf.
_MASKED = -100.0


def fixed_sizes(x: torch.Tensor, *dims: int) -> tuple[int, ...]:
    """`x`'s sizes along `dims` as plain ints, for sizes that never vary for one network input size.

    In eager mode this is `x.shape`; under the ONNX exporter's tracer an int becomes a constant
    where a read size would be recorded with all its arithmetic. BiRefNet's exported graph has
    a fixed height and width (only the batch varies), and traced heights and widths filled it
    with thousands of shape nodes (window masks, paddings, sampling grids) that ONNX Runtime
    then spent seconds on at every session start. The batch size is never read through this.
    """
    return tuple(int(x.shape[d]) for d in dims)


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int = 4
    mlp_ratio: float = 4.0

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the four output feature maps (strides 4, 8, 16, 32)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


SWIN_LARGE = SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12)
SWIN_TINY = SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the (2w-1)² bias table for each query/key pair."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N, both >= 0
    return rel[0] * (2 * window - 1) + rel[1]


def checkpoint_filter(state: dict, model: nn.Module) -> dict:
    """Add each attention block's `relative_position_index` when a checkpoint leaves it out
    (it is derived from the window size; published BiRefNet files differ on whether they store it)."""
    state = dict(state)
    for name, module in model.named_modules():
        key = f"{name}.relative_position_index" if name else "relative_position_index"
        if isinstance(module, WindowAttention) and key not in state:
            state[key] = relative_position_index(module.window)
    return state


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, window², C); H and W are multiples of `window`."""
    h, w, c = fixed_sizes(x, 1, 2, 3)
    x = x.view(-1, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, (h // window) * (w // window), window * window, c)


def from_windows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `to_windows`."""
    (c,) = fixed_sizes(x, -1)
    x = x.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, batch, device, dtype) -> torch.Tensor:
    """(batch, nW, 1, N, N) additive mask keeping attention inside the regions a cyclic shift joins.

    Built per image from the (nW, N) region labels: a mask made of constants alone would be
    folded by the ONNX exporter into a (nW, heads, N, N) constant for every shifted block (240 MB
    for RMBG-2.0's first stage at 1024), where the file now holds only the labels. `batch` is
    the input's batch size, read from its shape, so the exporter records it as the dynamic batch.
    """
    def bands(n: int) -> torch.Tensor:
        """0, 1 or 2 along one side: before the last window, in its unshifted part, in the shift."""
        at = torch.arange(n, device=device)
        return (at >= n - window).long() + (at >= n - shift).long()

    region = bands(h)[:, None] * 3 + bands(w)[None, :]  # 9 regions, as the published slices label them
    labels = to_windows(region[None, :, :, None], window)[0, :, :, 0]  # nW, N
    labels = labels.expand(batch, *fixed_sizes(labels, 0, 1))
    same = labels[:, :, None, :] == labels[:, :, :, None]
    return torch.where(same, 0.0, _MASKED).to(dtype)[:, :, None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        # The default scale, given: the exporter would otherwise compute it from the shape in the file.
        self.scale = 1.0 / math.sqrt(dim // num_heads)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self, dtype) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # Contiguous, so that adding the shift mask gives a contiguous mask too: attention would
        # otherwise copy that (windows, heads, N, N) mask once more in every shifted block.
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).to(dtype).contiguous()  # heads, N, N

    def forward(self, windows: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """windows: (B, nW, N, C); shift_mask: (B, nW, 1, N, N) or None."""
        nw, n, c = fixed_sizes(windows, 1, 2, 3)
        qkv = self.qkv(windows).view(-1, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*nW, heads, N, d)
        bias = self.position_bias(q.dtype)  # heads, N, N
        if shift_mask is not None:
            # Broadcast straight into a contiguous (B, nW, heads, N, N) mask: one pass, no copy after.
            bias = (bias + shift_mask.to(q.dtype)).view(-1, self.num_heads, n, n)
        else:
            bias = bias[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(-1, nw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, H, W, C), H and W unpadded."""
        h, w = fixed_sizes(x, 1, 2)
        win = self.window
        y = self.norm1(x)
        pad_h, pad_w = (-h) % win, (-w) % win
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = from_windows(self.attn(to_windows(y, win), shift_mask if self.shift else None), win, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        if pad_h or pad_w:
            y = y[:, :h, :w]
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token with twice the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = fixed_sizes(x, 1, 2, 3)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        # Neighbour order (row, col) = (0,0), (1,0), (0,1), (1,1), as the checkpoint expects.
        x = x.view(-1, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(-1, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this stage's output, the next stage's input)."""
        h, w = fixed_sizes(x, 1, 2)
        win = self.window
        hp, wp = h + (-h) % win, w + (-w) % win
        shift_mask = shifted_window_mask(hp, wp, win, win // 2, x.shape[0], x.device, x.dtype) \
            if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, shift_mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/4, W/4, C); sizes not divisible by the patch are zero-padded."""
        h, w = fixed_sizes(x, -2, -1)
        if h % self.patch or w % self.patch:
            x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Returns four normalised NCHW feature maps at strides 4, 8, 16 and 32."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        n = len(cfg.depths)
        self.layers = nn.ModuleList(
            SwinStage(dim, cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, downsample=i < n - 1)
            for i, dim in enumerate(cfg.channels)
        )
        for i, dim in enumerate(cfg.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            outs.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)
