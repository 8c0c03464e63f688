"""From (image, mask) to what people download: cut-outs, new backgrounds, refined edge colours."""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageFilter


def _alpha(image: Image.Image, mask: Image.Image) -> np.ndarray:
    """The subject's alpha: the mask, and where the image has transparency of its own, the minimum of the
    two (a pixel the photo made transparent stays so; the mask cannot add opacity), as uint8."""
    if image.size != mask.size:
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} but mask is {mask.size[0]}x{mask.size[1]}")
    alpha = np.asarray(mask.convert("L"), dtype=np.uint8)
    if image.mode == "RGBA":
        alpha = np.minimum(alpha, np.asarray(image.getchannel("A"), dtype=np.uint8))
    return alpha


def subject_alpha(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`_alpha` as an L image."""
    return Image.fromarray(_alpha(image, mask), "L")


def cutout(image: Image.Image, mask: Image.Image) -> Image.Image:
    """RGBA: the image's pixels with the mask as alpha."""
    alpha = _alpha(image, mask)
    out = image.convert("RGB").convert("RGBA")
    out.putalpha(Image.fromarray(alpha, "L"))
    return out


_RGB_FUNCTION = re.compile(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)", re.I)


def parse_color(spec) -> tuple[int, int, int]:
    """'#RRGGBB', '#RGB', 'RRGGBB', CSS names, 'rgb(r, g, b)' / 'rgba(r, g, b, a)' (Gradio's picker), or a tuple."""
    if isinstance(spec, (tuple, list)) and len(spec) >= 3:
        return tuple(int(v) for v in spec[:3])
    text = str(spec).strip()
    match = _RGB_FUNCTION.fullmatch(text)
    if match:
        return tuple(min(255, round(float(v))) for v in match.groups())
    if re.fullmatch(r"[0-9a-fA-F]{6}|[0-9a-fA-F]{3}", text):
        text = "#" + text
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ValueError(f"not a colour: {spec!r} (use #RRGGBB, a name like 'white', or rgb(r, g, b))") from None


def cover(background: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `background` to fill `size` keeping its aspect ratio, then centre-crop: never stretched."""
    width, height = size
    scale = max(width / background.width, height / background.height)
    scaled = background.convert("RGB").resize(
        (max(width, math.ceil(background.width * scale)), max(height, math.ceil(background.height * scale))),
        Image.Resampling.LANCZOS)
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def background_image(image: Image.Image, background, blur_radius: float | None = None) -> Image.Image:
    if isinstance(background, Image.Image):
        return cover(background, image.size)
    if isinstance(background, str) and background == "blur":
        radius = blur_radius if blur_radius is not None else 0.02 * max(image.size)
        return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
    return Image.new("RGB", image.size, parse_color(background))


def replace_background(image: Image.Image, mask: Image.Image, background, *, blur_radius=None) -> Image.Image:
    """RGB: the subject over a colour, 'blur' (the original, blurred) or another image."""
    alpha = _alpha(image, mask).astype(np.float32)[..., None] / 255.0
    fg = np.asarray(image.convert("RGB"), dtype=np.float32)
    bg = np.asarray(background_image(image, background, blur_radius), dtype=np.float32)
    return Image.fromarray(np.clip(alpha * fg + (1.0 - alpha) * bg + 0.5, 0, 255).astype(np.uint8), "RGB")


# -- foreground colour estimation -------------------------------------------------------------
# Germer, Uelwer, Conrad, Harmeling (2020), "Fast Multi-Level Foreground Estimation": find F and
# B with I = aF + (1-a)B, both smooth except where alpha changes, solved coarse to fine. Here each
# level runs vectorised Jacobi updates over whole tensors, so it runs on a GPU as well.

def _neighbour_sum(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shifted = (padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
    return sum(w * s for w, s in zip(weights, shifted))


def _neighbour_weights(alpha: torch.Tensor, regularization: float, gradient_weight: float) -> list[torch.Tensor]:
    padded = F.pad(alpha, (1, 1, 1, 1), mode="replicate")
    shifted = (padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
    return [regularization + gradient_weight * (alpha - s).abs() for s in shifted]


def _solve_level(image, alpha, fg, bg, iterations, regularization, gradient_weight):
    weights = _neighbour_weights(alpha, regularization, gradient_weight)
    total = sum(weights)
    a, b = alpha, 1.0 - alpha
    # Per pixel 2x2 system [[a²+W, ab], [ab, b²+W]] [F, B] = [a I + ΣwF_j, b I + ΣwB_j].
    m00, m01, m11 = a * a + total, a * b, b * b + total
    det = m00 * m11 - m01 * m01
    for _ in range(iterations):
        r0 = a * image + _neighbour_sum(fg, weights)
        r1 = b * image + _neighbour_sum(bg, weights)
        fg = ((m11 * r0 - m01 * r1) / det).clamp(0, 1)
        bg = ((m00 * r1 - m01 * r0) / det).clamp(0, 1)
    return fg, bg


def estimate_foreground(image: Image.Image, mask: Image.Image, *, regularization: float = 1e-5,
                        gradient_weight: float = 1.0, coarse_iterations: int = 10, fine_iterations: int = 2,
                        device=None) -> Image.Image:
    """RGB foreground colours: at soft edges, what the subject's colour is without the old background."""
    device = torch.device(device) if device else torch.device("cpu")
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    alpha_full = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    rgb, alpha_full = rgb.to(device), alpha_full.to(device)
    height, width = rgb.shape[-2:]
    levels = max(1, math.ceil(math.log2(max(width, height))))
    fg = bg = rgb.mean(dim=(2, 3), keepdim=True)
    for level in range(levels + 1):
        size = (max(1, round(height ** (level / levels))), max(1, round(width ** (level / levels))))
        level_rgb = F.interpolate(rgb, size=size, mode="area") if size != (height, width) else rgb
        level_alpha = F.interpolate(alpha_full, size=size, mode="area") if size != (height, width) else alpha_full
        fg = F.interpolate(fg, size=size, mode="nearest")
        bg = F.interpolate(bg, size=size, mode="nearest")
        iterations = coarse_iterations if max(size) <= 32 else fine_iterations
        fg, bg = _solve_level(level_rgb, level_alpha, fg, bg, iterations, regularization, gradient_weight)
    out = (fg[0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
    return Image.fromarray(out, "RGB")


def refine_cutout(image: Image.Image, mask: Image.Image, **kwargs) -> Image.Image:
    """A cut-out whose edge colours are the estimated foreground: no halo of the old background."""
    foreground = estimate_foreground(image, mask, **kwargs)
    if image.mode == "RGBA":
        foreground = foreground.convert("RGBA")
        foreground.putalpha(image.getchannel("A"))
    return cutout(foreground, mask)
