"""Everything around the network for one 12-megapixel photo: decode, resize, compose, encode.

    python bench/overhead.py [--runs 5] [--no-append]

Times each stage of `RemovalPipeline` separately (median of --runs), with the network's own
time reported beside but not counted, and the PNG encoder at zlib levels 1 (ours) and 6
(Pillow's default) for the size/speed trade. Appends to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, report  # noqa: E402

from rmbg_demo.compose import cutout  # noqa: E402
from rmbg_demo.imageio import encode_image, load_image  # noqa: E402
from rmbg_demo.pipeline import RemovalPipeline, RemovalResult  # noqa: E402
from rmbg_demo.request import RemovalOptions, rendered  # noqa: E402


def twelve_megapixel_photo() -> Path:
    path = ROOT / "bench" / "out" / "photo-12mp.jpg"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(ROOT / "assets" / "astronaut.jpg").resize((4000, 3000), Image.Resampling.LANCZOS).save(
            path, quality=92)
    return path


def pillow_png(image, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def timed(fn, runs: int):
    times, value = [], None
    for _ in range(runs):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    path = twelve_megapixel_photo()
    pipeline = RemovalPipeline("u2netp", device="cpu")
    decode_s, image = timed(lambda: load_image(path), args.runs)
    pre_s, batch = timed(lambda: pipeline.preprocess(image), args.runs)
    net_s, probs = timed(lambda: pipeline.engine(batch), args.runs)
    post_s, mask = timed(lambda: pipeline.to_mask(probs[0], image.size), args.runs)
    compose_s, cut = timed(lambda: cutout(image, mask), args.runs)
    encode_s, png = timed(lambda: encode_image(cut, "png", compress_level=1), args.runs)
    pillow1_s, png1 = timed(lambda: pillow_png(cut, compress_level=1), max(1, args.runs // 2))
    default_s, png6 = timed(lambda: pillow_png(cut), max(1, args.runs // 2))
    overhead = decode_s + pre_s + post_s + compose_s + encode_s
    result = RemovalResult(image, mask, "u2netp")
    framings = {  # what framing adds to the plain cut-out, same photo, same mask
        "crop + 10% margin": RemovalOptions(crop=True, margin="10%"),
        "canvas 2000x2000, 80%, bottom, drop shadow, white": RemovalOptions(
            canvas="2000x2000", scale="80%", position="bottom", shadow="drop", background="white"),
        "crop + canvas 4000x3000 + contact shadow, transparent": RemovalOptions(
            crop=True, canvas="4000x3000", scale="85%", shadow="contact"),
    }
    framed = {name: timed(lambda options=options: rendered(result, options), args.runs)[0] - compose_s
              for name, options in framings.items()}
    text = "\n".join([
        f"## {datetime.date.today()} app overhead for a 12 MP photo ({image.width}x{image.height}), CPU "
        f"({platform.machine()}, {torch.get_num_threads()} threads)",
        f"- command: `python bench/overhead.py {' '.join(sys.argv[1:])}`; medians of {args.runs} runs",
        "",
        "| decode | preprocess | postprocess (mask resize) | compose | PNG encode (level 1) "
        "| total, network excluded |",
        "|---|---|---|---|---|---|",
        f"| {decode_s:.3f} s | {pre_s:.3f} s | {post_s:.3f} s | {compose_s:.3f} s | {encode_s:.3f} s | "
        f"**{overhead:.3f} s** |",
        "",
        f"- network (u2netp, for scale, not counted): {net_s:.3f} s",
        f"- PNG, ours (Up filter, parallel deflate, level 1): {encode_s:.3f} s, {len(png) / 2**20:.1f} MiB; "
        f"Pillow at level 1: {pillow1_s:.3f} s, {len(png1) / 2**20:.1f} MiB; Pillow's default (level 6): "
        f"{default_s:.3f} s, {len(png6) / 2**20:.1f} MiB",
        "",
        "Framing, added to the plain cut-out's compose (encoding the smaller or larger picture not counted):",
        "",
        "| framing | added s |",
        "|---|---|",
        *[f"| {name} | {seconds:+.3f} |" for name, seconds in framed.items()],
        "",
    ])
    report(text, append=not args.no_append)


if __name__ == "__main__":
    main()
