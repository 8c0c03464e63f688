"""Side-by-side benchmark: the RMBG-2.0 model card's snippet vs our pipeline, same network, same images.

    python bench/bench.py [--images A.jpg B.jpg ...] [--weights model.safetensors] [--device cpu|cuda]
                          [--runs 3] [--size 1024] [--concurrent 8] [--compile] [--profile] [--no-append]
    python bench/bench.py --cli [--runs 3] [--runtimes openvino:float32 openvino:bfloat16]
                                                 # whole commands, model loading included

(a) "card": the model card's code, per image, float32, PIL/torchvision transforms,
    `torch.set_float32_matmul_precision('high')`, on our BiRefNet.
(b) "ours": `RemovalPipeline` at the settings it picks for the device (or --dtype), one
    request at a time (latency), then --concurrent N requests at once sharing network batches
    (throughput, as the app serves N users; 8 by default on a GPU, off on the CPU).
--profile writes the top operators of one of our forward passes to bench/out/profile-<device>.txt.
Without --weights the network gets the parity fixture's deterministic weights: timings do
not depend on weight values, and the mask comparison still checks the two paths agree.
Results are printed and appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_card  # noqa: E402
from common import OUT, ROOT, device_name, fixture_network, fixture_weights_file, sync  # noqa: E402
from common import report as write_report  # noqa: E402
from runtimes import cpu_model  # noqa: E402

from rmbg_demo import load_model  # noqa: E402
from rmbg_demo.pipeline import RemovalPipeline  # noqa: E402

DEFAULT_IMAGES = [ROOT / "assets" / n for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]


def network(args, device, dtype=None):
    if args.weights:
        return load_model(args.model, args.weights, device=device, dtype=dtype)
    return fixture_network(args.model, device, dtype)


def torch_engine(pipeline):
    """The TorchEngine under any wrapper (request batching)."""
    engine = pipeline.engine
    return getattr(engine, "engine", engine)


def card_run(model, paths, size, device):
    """The model card's snippet (bench/model_card.py), per image."""
    masks, times = [], []
    for path in paths:
        started = time.perf_counter()
        mask = model_card.cut_out(model, path, args_out_dir, device, size)
        times.append(time.perf_counter() - started)
        masks.append(np.asarray(mask, dtype=np.int16))
    return masks, times


def ours_run(pipeline, paths):
    from rmbg_demo.imageio import encode_image

    masks, times = [], []
    for path in paths:
        started = time.perf_counter()
        result = pipeline(path)
        (Path(args_out_dir) / f"ours-{Path(path).stem}.png").write_bytes(encode_image(result.cutout()))
        sync(torch_engine(pipeline).torch_device)
        times.append(time.perf_counter() - started)
        masks.append(np.asarray(result.mask, dtype=np.int16))
    return masks, times


def concurrent_run(pipeline, paths, clients: int, rounds: int) -> float:
    """`clients` threads each sending one image at a time, as that many app users would; images/s."""
    work = [path for _ in range(rounds) for path in paths] * clients
    with ThreadPoolExecutor(max_workers=clients) as pool:
        started = time.perf_counter()
        list(pool.map(lambda path: pipeline(path).mask, work))
        sync(torch_engine(pipeline).torch_device)
        return len(work) / (time.perf_counter() - started)


def profile_forward(pipeline, path) -> str:
    """The top operators of one forward pass of ours, by time on the device."""
    from torch.profiler import ProfilerActivity, profile

    batch = pipeline.preprocess(pipeline.load(path))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pipeline.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        pipeline.probabilities(batch)
        sync(torch_engine(pipeline).torch_device)
    key = "self_cuda_time_total" if pipeline.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


def difference(masks_a, masks_b) -> str:
    diffs = [np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in zip(masks_a, masks_b)]
    return f"max {max(int(d.max()) for d in diffs)}/255, mean {np.mean([d.mean() for d in diffs]):.3f}/255"


def float32_masks(args, device, paths):
    """Our pipeline's masks in float32 (untimed): the reference the faster dtypes must stay within 2/255 of."""
    pipeline = RemovalPipeline(args.model, None, device, "float32", input_size=(args.size, args.size),
                               network=network(args, device))
    return [np.asarray(pipeline(path).mask) for path in paths]


def summary(times, n_images):
    times = sorted(times)
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    median = statistics.median(times)
    return {"median_s": median, "p95_s": p95, "images_per_s": 1.0 / median if median else float("inf")}


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> str:
    """Since the last reset on CUDA; on the CPU the whole process's peak RSS (both sides)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"


args_out_dir = OUT


def cli_benchmark(args) -> str:
    """Wall time of whole commands, model loading included: the card snippet vs `rmbg remove`."""
    import subprocess

    weights = Path(args.weights) if args.weights else fixture_weights_file(args.model)
    images = [str(p) for p in args.images]
    def ours(dtype: str, runtime: str = "auto") -> list[str]:
        out = args_out_dir / f"cli-{runtime}-{dtype}"
        return [sys.executable, "-m", "rmbg_demo", "remove", *images, "-o", str(out),
                "--model", args.model, "--weights", str(weights), "--overwrite", "-q", "--device", args.device,
                "--dtype", dtype, "--runtime", runtime]

    # (label, output folder, command); a --dtype other than auto runs beside ours at auto, for the ratio
    commands = [("model card snippet", "card", [sys.executable, str(ROOT / "bench" / "model_card.py"), str(weights),
                                                 str(args_out_dir / "card")] + images),
                ("rmbg remove (ours)", "cli-auto-auto", ours("auto"))]
    if args.dtype != "auto":
        commands.append((f"rmbg remove --dtype {args.dtype} (ours)", f"cli-auto-{args.dtype}", ours(args.dtype)))
    for choice in args.runtimes or ():
        runtime, _, dtype = choice.partition(":")
        commands.append((f"rmbg remove --runtime {runtime} --dtype {dtype or 'auto'} (ours)",
                         f"cli-{runtime}-{dtype or 'auto'}", ours(dtype or "auto", runtime)))
    first_starts = []
    for name, _, command in commands[1:]:
        # One start of each of ours first, untimed in the table: a runtime that converts or compiles (OpenVINO)
        # fills its cache there, as a user's first start does; later starts are what the table compares.
        started = time.perf_counter()
        run = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
        model_line = next((line for line in run.stderr.splitlines() if line.startswith("model: ")), "")
        first_starts.append(f"- first start of {name}: {time.perf_counter() - started:.0f} s, not in the table; "
                            f"{model_line}")
    (args_out_dir / "card").mkdir(parents=True, exist_ok=True)
    times = {name: [] for name, _, _ in commands}
    for _ in range(args.runs):  # interleaved runs, so all see the same machine state
        for name, _, command in commands:
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
            times[name].append(time.perf_counter() - started)
    alpha = {folder: [np.asarray(Image.open(args_out_dir / folder / f"{image.stem}.png"))[..., 3]
                      for image in args.images] for _, folder, _ in commands}
    reference = float32_masks(args, torch.device(args.device), images)
    rows = "\n".join(f"| {name} | {statistics.median(t):.1f} | {', '.join(f'{v:.1f}' for v in t)} |"
                     for name, t in times.items())
    card = statistics.median(times["model card snippet"])
    speedups = "\n".join(
        f"- {name}: {card / statistics.median(times[name]):.2f}x the card; alpha difference vs the card: "
        f"{difference(alpha['card'], alpha[folder])}; vs our pipeline in float32: "
        f"{difference(reference, alpha[folder])}"
        for name, folder, _ in commands[1:])
    return "\n".join([
        f"## {datetime.date.today()} CLI end to end, {args.model} on {args.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        f"- command: `python bench/bench.py {' '.join(sys.argv[1:])}`",
        f"- CPU: {cpu_model()}; load average {os.getloadavg()[0]:.1f} at the end (a shared machine)",
        f"- torch {torch.__version__}, Python {platform.python_version()}; weights: "
        f"{'file' if args.weights else 'parity fixture saved as .safetensors'}; "
        f"images: {', '.join(p.name for p in args.images)}",
        "",
        "| command (3 photos, model loading included) | median s | runs s |",
        "|---|---|---|",
        rows,
        "",
        speedups,
        *first_starts,
        "",
    ])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cli", action="store_true", help="time whole commands instead of per-image latency")
    parser.add_argument("--images", nargs="+", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--model", default="rmbg-2.0")
    parser.add_argument("--weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runtimes", nargs="+", metavar="RUNTIME[:DTYPE]",
                        help="with --cli, also time `rmbg remove --runtime RUNTIME --dtype DTYPE` (openvino:float32)")
    parser.add_argument("--runs", type=int, default=3, help="passes over the images for each side")
    parser.add_argument("--concurrent", type=int, metavar="N",
                        help="also time N concurrent requests sharing network batches (default: 8 on CUDA, 0 on CPU)")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="torch.compile our network (start-up then includes compiling and warm-up)")
    parser.add_argument("--profile", action="store_true", help="write a profile of one of our forward passes")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    args_out_dir.mkdir(parents=True, exist_ok=True)
    if args.cli:
        if args.model != "rmbg-2.0":
            parser.error("--cli times RMBG-2.0's model card snippet: leave --model at rmbg-2.0")
        return report(cli_benchmark(args), args)
    device = torch.device(args.device)
    concurrent = args.concurrent if args.concurrent is not None else (8 if device.type == "cuda" else 0)
    torch.set_float32_matmul_precision("high")

    def timed_start(build):
        started = time.perf_counter()
        built = build()
        sync(device)
        return built, time.perf_counter() - started

    card_model, card_start = timed_start(lambda: network(args, device))
    pipeline, ours_start = timed_start(lambda: RemovalPipeline(
        args.model, None, device, args.dtype, input_size=(args.size, args.size), network=network(args, device),
        batch_requests=max(1, concurrent), compile=args.compile))
    # name -> (start-up seconds, one pass over the images returning (masks, seconds per image))
    sides = {"model card (fp32)": (card_start, lambda: card_run(card_model, args.images, args.size, device)),
             "ours": (ours_start, lambda: ours_run(pipeline, args.images))}
    if args.compile:  # the same settings without compiling, side by side
        eager, eager_start = timed_start(lambda: RemovalPipeline(
            args.model, None, device, args.dtype, input_size=(args.size, args.size), network=network(args, device)))
        sides["ours, not compiled"] = (eager_start, lambda: ours_run(eager, args.images))

    times, masks, memory = {name: [] for name in sides}, {}, {}
    for _ in range(args.runs):  # interleaved, so every side sees the same machine state
        for name, (_, run) in sides.items():
            reset_peak_memory(device)
            masks[name], t = run()
            times[name] += t
            memory[name] = peak_memory(device)
    card_masks, ours_masks = masks["model card (fp32)"], masks["ours"]
    in_float32 = torch_engine(pipeline).dtype == torch.float32
    reference = ours_masks if in_float32 else float32_masks(args, device, args.images)
    stats = {name: summary(t, len(args.images)) for name, t in times.items()}
    card, ours = stats["model card (fp32)"], stats["ours"]
    rows = [f"| {name} | 1 | {sides[name][0]:.2f} | {st['median_s']:.3f} | {st['p95_s']:.3f} | "
            f"{st['images_per_s']:.2f} | {memory[name]} |" for name, st in stats.items()]
    if concurrent > 1:
        del card_model
        reset_peak_memory(device)
        throughput = concurrent_run(pipeline, args.images, concurrent, args.runs)
        rows.append(f"| ours, {concurrent} concurrent requests (largest shared batch {pipeline.batcher.largest}) | "
                    f"{concurrent} | | | | {throughput:.2f} | {peak_memory(device)} |")
    lines = [
        f"## {datetime.date.today()} {args.model} on {device_name(device)}",
        f"- command: `python bench/bench.py {' '.join(sys.argv[1:])}`",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"weights: {'file' if args.weights else 'parity fixture (deterministic)'}; ours: {pipeline.describe()}",
        f"- images: {', '.join(p.name for p in args.images)}; {args.runs} runs each; input {args.size}x{args.size}; "
        "latency = one request, file to PNG",
        "",
        "| path | requests at once | start-up s | median s/img | p95 s/img | img/s | peak memory |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- speed-up (median latency): {card['median_s'] / ours['median_s']:.2f}x; "
        f"mask difference of ours vs the card: {difference(card_masks, ours_masks)}; "
        f"vs our pipeline in float32: {difference(reference, ours_masks)}",
        "",
    ]
    if args.compile:
        uncompiled = stats["ours, not compiled"]
        speedup = uncompiled["median_s"] / ours["median_s"]
        lines.insert(-1, f"- compiled vs not compiled (median latency): {speedup:.2f}x; "
                         f"compiling and warm-up: {ours_start - sides['ours, not compiled'][0]:.1f} s")
    if args.profile:
        path = args_out_dir / f"profile-{device.type}.txt"
        path.write_text(profile_forward(pipeline, args.images[0]))
        lines.insert(-1, f"- profile of one forward pass: {path.relative_to(ROOT)}")
    report("\n".join(lines), args)


def report(text: str, args) -> None:
    write_report(text, append=not args.no_append)


if __name__ == "__main__":
    main()
