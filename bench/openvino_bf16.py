"""Where OpenVINO's bf16 moves BiRefNet's masks: the deformable convolutions converted in their sampled form
(grid_sample + matmul, what an ONNX export holds) vs as OpenVINO's own DeformableConvolution (what
`--runtime openvino` converts since), each at f32 and bf16, side by side in one run.

    python bench/openvino_bf16.py [--model rmbg-2.0] [--size 1024] [--runs 3] [--no-append]

Parity-fixture weights; the bench photos preprocessed as the pipeline does; one forward per photo, timed
(median over photos x runs); probabilities compared with PyTorch float32 at the network's size.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import numpy as np
import torch
from common import fixture_network, report
from runtimes import DEFAULT_IMAGES, cpu_model, openvino_version

from rmbg_demo.engines.ov import converted_model
from rmbg_demo.models import get_spec
from rmbg_demo.processing import preprocess


def converted(network, spec, size, native: bool):
    started = time.perf_counter()
    model = converted_model(network, spec, size, native)
    kinds = {op.get_type_name() for op in model.get_ops()} & {"GridSample", "DeformableConvolution"}
    return model, time.perf_counter() - started, ", ".join(sorted(kinds))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rmbg-2.0")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    import openvino as ov
    from PIL import Image

    spec, size = get_spec(args.model), (args.size, args.size)
    network = fixture_network(args.model)
    inputs = [preprocess(Image.open(path).convert("RGB"), spec, size) for path in DEFAULT_IMAGES]
    with torch.inference_mode():
        reference = [network(x)[spec.output_index].sigmoid().numpy() for x in inputs]
    core, rows = ov.Core(), []
    for native in (False, True):
        model, seconds, kinds = converted(network, spec, size, native)
        for hint in ("f32", "bf16"):
            config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
            compiled = core.compile_model(model, "CPU", config)
            compiled(inputs[0].numpy())  # the first inference allocates
            times, worst, worst8, means = [], 0.0, 0, []
            for _ in range(args.runs):
                for x, expected in zip(inputs, reference):
                    started = time.perf_counter()
                    raw = compiled(x.numpy())[0]
                    times.append(time.perf_counter() - started)
                    got = 1 / (1 + np.exp(-raw))
                    worst = max(worst, float(np.abs(got - expected).max()))
                    worst8 = max(worst8, int(np.abs(np.round(got * 255) - np.round(expected * 255)).max()))
                    means.append(float(np.abs(got - expected).mean()))
            rows.append((f"{'native DeformableConvolution' if native else 'sampled (grid_sample)'}", kinds, hint,
                         statistics.median(times), worst, worst8, float(np.mean(means)), seconds))
            print(rows[-1], flush=True)
    f32 = {row[0]: row[3] for row in rows if row[2] == "f32"}
    lines = [f"## {datetime.date.today()} OpenVINO bf16 and BiRefNet's deformable convolutions: {args.model} at "
             f"{args.size} (x86_64, CPU: {cpu_model()})",
             f"- command: `python bench/openvino_bf16.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"- openvino {openvino_version()}, torch {torch.__version__}; parity-fixture weights; "
             f"{', '.join(p.name for p in DEFAULT_IMAGES)}; one forward, median of {args.runs} runs x "
             f"{len(inputs)} photos; probabilities vs PyTorch float32 at {args.size}",
             "",
             "| deformable convolutions converted as | ops in the graph | precision | s per forward | vs its f32 | "
             "max abs. difference | max 8-bit difference | mean abs. difference | conversion s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, kinds, hint, seconds, worst, worst8, mean, convert_seconds in rows:
        lines.append(f"| {label} | {kinds} | {hint} | {seconds:.2f} | {f32[label] / seconds:.2f}x | {worst:.4f} | "
                     f"{worst8}/255 | {mean:.5f} | {convert_seconds:.0f} |")
    report("\n".join(lines), append=not args.no_append)


if __name__ == "__main__":
    main()
