"""How sure a cut-out is: one number in [0, 1] per image (1 = sure), from the network's probability map at
its own resolution, for every model. A clean cut-out is near 0 or 1 almost everywhere; a doubtful one has
wide grey regions for the size of its subject, or no subject at all, or one that fills the frame.

`CANDIDATES` are the scores `bench/confidence.py` compares against the true error on a labelled set;
`confidence` is the one that predicted it best there (the figures are in bench/RESULTS.md and the README).
Each takes a (h, w) float array of probabilities and costs well under 1 % of a network pass.
"""
from __future__ import annotations

import numpy as np

UNSURE = (0.1, 0.9)  # probabilities between these are grey: neither subject nor background
EMPTY, FULL = 0.002, 0.98  # a subject under 0.2 % of the frame is none; over 98 %, no background was found


def _as_map(probability) -> np.ndarray:
    array = probability.detach().cpu().numpy() if hasattr(probability, "detach") else np.asarray(probability)
    array = np.asarray(array, dtype=np.float32).squeeze()
    if array.ndim != 2:
        raise ValueError(f"expected a (h, w) probability map, got shape {array.shape}")
    return np.clip(array, 0.0, 1.0)


def unsure_share(p: np.ndarray) -> float:
    """1 - the share of grey pixels, relative to the subject's area (a thin grey edge round a big subject
    is normal; the same grey round a small one is not)."""
    grey = float(np.mean((p > UNSURE[0]) & (p < UNSURE[1])))
    area = float(np.mean(p >= 0.5))
    return float(np.clip(1.0 - grey / max(area, 0.02), 0.0, 1.0))


def mean_entropy(p: np.ndarray) -> float:
    """1 - the mean binary entropy of the map, in bits."""
    q = np.clip(p, 1e-6, 1 - 1e-6)
    entropy = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return float(1.0 - entropy.mean())


def edge_sharpness(p: np.ndarray) -> float:
    """How steep the subject's edge is: the share of the map's transition that happens within the
    boundary band (grey pixels) compared with the length of that band."""
    inside = p >= 0.5
    boundary = (inside != np.roll(inside, 1, 0)) | (inside != np.roll(inside, 1, 1))
    edge_pixels = max(int(boundary.sum()), 1)
    grey = int(((p > UNSURE[0]) & (p < UNSURE[1])).sum())
    return float(np.clip(1.0 - (grey / edge_pixels - 1.0) / 8.0, 0.0, 1.0))


def framing(p: np.ndarray) -> float:
    """0 for no subject or no background, and lower when the subject touches every side of the frame."""
    area = float(np.mean(p >= 0.5))
    if area < EMPTY or area > FULL:
        return 0.0
    inside = p >= 0.5
    sides = sum(bool(side.any()) for side in (inside[0], inside[-1], inside[:, 0], inside[:, -1]))
    return 1.0 - 0.125 * sides  # 0.5 when it touches all four


def combined(p: np.ndarray) -> float:
    """The grey share, and 0 for a map with no subject or no background: a sure map is crisp and shows a
    subject. (Lowering the score for a subject that touches the frame's sides made it worse on the
    labelled set: subjects cut by the frame are common and fine.)"""
    area = float(np.mean(p >= 0.5))
    return 0.0 if area < EMPTY or area > FULL else unsure_share(p)


CANDIDATES = {"unsure_share": unsure_share, "mean_entropy": mean_entropy, "edge_sharpness": edge_sharpness,
              "framing": framing, "combined": combined}
CHOSEN = "combined"  # bench/confidence.py: the best Spearman correlation with the true error


def confidence(probability) -> float:
    """The score of one probability map ((h, w), (1, h, w) or (1, 1, h, w); numpy or torch), in [0, 1]."""
    return round(CANDIDATES[CHOSEN](_as_map(probability)), 4)
