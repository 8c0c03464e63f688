"""Steady edges: temporal smoothing of the probability maps that lets go wherever the picture moved.

A plain moving average calms flicker but drags moving edges behind the subject. Here each pixel
keeps part of its previous smoothed value only where the frame itself did not change: the new map's
weight is `1 - strength` where consecutive frames agree and rises to 1 where they differ by more
than the noise (compared on small, mean-levelled greyscale copies, so sensor noise and exposure
drift do not count as motion). The motion map is widened a little so the edge's surroundings follow
it too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

GUIDE_SIDE = 96  # motion is judged on frames scaled down to about this many pixels on their long side


class MotionAwareSmoother:
    """Call once per frame, in order: (1, h, w) probabilities and the frame -> smoothed (1, h, w) probabilities."""

    def __init__(self, strength: float = 0.75, still: float = 6.0, moving: float = 12.0, spread: int = 2):
        self.strength = strength  # share of the previous value kept where nothing moved
        self.still, self.moving = still, moving  # grey-level change (0..255) at which motion starts / is certain
        self.spread = spread  # pixels of the guide by which motion is widened
        self._previous: torch.Tensor | None = None
        self._previous_guide: torch.Tensor | None = None

    def reset(self) -> None:
        self._previous = self._previous_guide = None

    def guide(self, frame: Image.Image) -> torch.Tensor:
        """A small greyscale copy of the frame, levelled to mean 0: (1, 1, gh, gw) float."""
        scale = GUIDE_SIDE / max(frame.size)
        size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
        grey = np.asarray(frame.convert("L").resize(size, Image.Resampling.BOX), dtype=np.float32)
        return torch.from_numpy(grey - grey.mean())[None, None]

    def motion(self, guide: torch.Tensor, previous: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """0 (still) .. 1 (moving) per pixel of a (h, w) map."""
        change = (guide - previous).abs()
        if self.spread:
            change = F.max_pool2d(change, 2 * self.spread + 1, stride=1, padding=self.spread)
        moving = ((change - self.still) / max(1e-6, self.moving - self.still)).clamp(0, 1)
        return F.interpolate(moving, size=size, mode="bilinear", align_corners=False)[0]

    def __call__(self, probability: torch.Tensor, frame: Image.Image) -> torch.Tensor:
        guide = self.guide(frame)
        if self._previous is None or self._previous.shape != probability.shape \
                or self._previous_guide.shape != guide.shape:
            smoothed = probability
        else:
            weight_new = 1 - self.strength * (1 - self.motion(guide, self._previous_guide, probability.shape[-2:]))
            smoothed = weight_new * probability + (1 - weight_new) * self._previous
        self._previous, self._previous_guide = smoothed, guide
        return smoothed
