"""`rmbg remove --ray` against the plain `rmbg remove` on the same images, and `rmbg serve` under load.

Job: N small images (default 200, 160x120) through u2netp, each command in its own process, run
alternately; wall times include start-up (Python, model loading, and for Ray starting a local
instance), as a user waits for them. `--torch-model birefnet-lite` adds a few images through a torch
network with the parity fixture's deterministic weights (RMBG-2.0's layout at Swin-T size) and
compares the two commands' masks. `--serve` runs the load test: C clients x R requests of distinct
colour patches against `rmbg serve` on 127.0.0.1, checking every answer's pixels, with the peak
memory of the replica. Also prints a paper estimate of images/hour on N GPUs from the model card's
latency. Appends everything to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's rmbg_demo, not another installed copy
CARD_MS_A100 = 69.4  # BiRefNet Swin-L, fp16, batch 1, 1024x1024 on an A100 (RMBG-2.0 / BiRefNet model card)
RAY_JOB = "import sys; from rmbg_demo.cli import main; sys.exit(main(sys.argv[1:]))"


def make_images(folder: Path, count: int, size=(160, 120)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        pixels = rng.integers(80, 150, (height, width, 3)).astype(np.uint8)
        pixels[height // 5:height * 4 // 5, width // 4:width * 3 // 4] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=92)


def timed(command: list[str], env=None) -> tuple[float, str]:
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    wall = time.perf_counter() - started
    if run.returncode not in (0, 1):
        raise RuntimeError(f"{command[:4]} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return wall, run.stderr


def compare_jobs(images: Path, work: Path, model_args: list[str], runs: int) -> dict:
    """Median wall seconds of the plain CLI and the Ray job (alternating), and the largest mask difference."""
    plain, ray_job, job_only, stages = [], [], [], ""
    for run in range(runs):
        out_plain, out_ray = work / f"plain{run}", work / f"ray{run}"
        wall, _ = timed([sys.executable, "-m", "rmbg_demo", "remove", str(images), "-o", str(out_plain),
                         "--mask", "-q", *model_args])
        plain.append(wall)
        wall, err = timed([sys.executable, "-c", RAY_JOB, "remove", str(images), "-o", str(out_ray), "--mask",
                           "-q", *model_args, "--ray"])
        ray_job.append(wall)
        found = re.search(r"in ([\d.]+) s \(([\d.]+) images/s\)", err)
        job_only.append(float(found.group(1)) if found else float("nan"))
        stages = next((line for line in err.splitlines() if line.startswith("time per stage")), "")
    worst = 0
    for mask in sorted(out_plain.glob("*_mask.png")):
        a = np.asarray(Image.open(mask)).astype(int)
        b = np.asarray(Image.open(out_ray / mask.name)).astype(int)
        worst = max(worst, int(np.abs(a - b).max()))
    count = len(list(images.iterdir()))
    return {"plain": plain, "ray": ray_job, "job": job_only, "images": count, "max_mask_diff": worst,
            "stages": stages}


def fixture_weights(name: str, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "rmbg2"))
    import parity
    from safetensors.torch import save_file

    from rmbg_demo import build_model

    model = build_model(name)
    path = folder / f"{name}-fixture.safetensors"
    save_file({k: v.contiguous() for k, v in parity.deterministic_state_dict(model).items()}, str(path))
    return path


def replica_peak_mib() -> float:
    """Peak resident memory (VmHWM) of the Serve replica processes on this machine."""
    peak = 0.0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ServeReplica" in (entry / "cmdline").read_bytes():
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def serve_load(clients: int, requests: int, max_batch: int) -> dict:
    import urllib.error
    import urllib.request

    from serve import patch  # bench/serve.py's load test sends the same patches

    from rmbg_demo.cluster.runtime import connect
    from rmbg_demo.cluster.serve import start_service
    from rmbg_demo.service.settings import ServeSettings

    connect(None, quiet=True)
    url = start_service(ServeSettings(model="u2netp", max_batch=max_batch), port=8765,
                        max_queued=4 * clients)
    latencies, problems, lock = [], [], threading.Lock()

    def client(index: int) -> None:
        for request in range(requests):
            colour = ((37 * index + 11 * request) % 256, (91 * request + 50) % 256, (23 * index + 160) % 256)
            size = (32 + 4 * index, 24 + (request % 16))
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/remove", data=patch(colour, size),
                                                                   method="POST"), timeout=300) as response:
                    body = response.read()
                cut = Image.open(io.BytesIO(body))
                centre = cut.getpixel((size[0] // 2, size[1] // 2))[:3]
                problem = None if cut.size == size and centre == colour else f"cross-talk {index}/{request}"
            except (urllib.error.URLError, OSError) as exc:
                problem = f"{index}/{request}: {exc}"
            with lock:
                latencies.append(time.perf_counter() - started)
                if problem:
                    problems.append(problem)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests": requests, "wall": wall, "rate": len(latencies) / wall,
            "p50": ordered[len(ordered) // 2], "p95": ordered[int(len(ordered) * 0.95) - 1],
            "errors": len(problems), "first_problems": problems[:3], "replica_peak_mib": replica_peak_mib()}


def paper_estimate(overhead: float) -> list[str]:
    """Images/hour at the card's latency; the job's stages overlap, so the network's rate is the ceiling and
    a measured ratio below 1 (the job beating the serial CLI) is not credited."""
    per_gpu = 3600 * 1000 / CARD_MS_A100
    penalty = max(1.0, overhead)
    rows = ["| GPUs | images/hour, network only | with the job's measured overhead |", "|---|---|---|"]
    for gpus in (1, 4, 8, 16):
        rows.append(f"| {gpus} | {per_gpu * gpus:,.0f} | {per_gpu * gpus / penalty:,.0f} |")
    return rows


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--torch-model", default=None, help="e.g. birefnet-lite: fixture weights, a few images")
    parser.add_argument("--torch-images", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="also the serve load test")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    command = "python bench/ray_job.py " + " ".join(sys.argv[1:])
    lines = [f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC Ray job vs plain CLI ({machine()})",
             f"- command: `{command}`"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "in", args.images)
        found = compare_jobs(work / "in", work, ["--model", "u2netp", "--batch-size", str(args.batch_size)],
                             args.runs)
        plain, ray_wall = statistics.median(found["plain"]), statistics.median(found["ray"])
        overhead = ray_wall / plain
        lines += [(f"- {found['images']} images 160x120, u2netp, --batch-size {args.batch_size}, --mask; "
                  f"medians of {args.runs} alternating runs, each command a fresh process (start-up included)"),
                  "", "| command | median s | runs s | images/s |", "|---|---|---|---|",
                  (f"| rmbg remove | {plain:.1f} | {', '.join(f'{t:.1f}' for t in found['plain'])} | "
                  f"{found['images'] / plain:.2f} |"),
                  (f"| rmbg remove --ray (local Ray started by the command) | {ray_wall:.1f} | "
                  f"{', '.join(f'{t:.1f}' for t in found['ray'])} | {found['images'] / ray_wall:.2f} |"), "",
                  (f"- overhead ratio (Ray / plain, wall): **{overhead:.2f}x**; the job alone (after Ray started): "
                  f"median {statistics.median(found['job']):.1f} s"),
                  f"- masks: max difference {found['max_mask_diff']}/255 between the two commands",
                  f"- Ray's own account: {found['stages']}"]
        if args.torch_model:
            weights = fixture_weights(args.torch_model, work)
            make_images(work / "torch_in", args.torch_images)
            torch_found = compare_jobs(work / "torch_in", work / "t", ["--model", args.torch_model, "--weights",
                                                                       str(weights), "--batch-size", "1"], 1)
            lines += [(f"- {args.torch_model} (fixture weights, 1024x1024 network input), {args.torch_images} images, "
                      f"one run: plain {torch_found['plain'][0]:.1f} s, Ray {torch_found['ray'][0]:.1f} s; "
                      f"masks max difference {torch_found['max_mask_diff']}/255")]
    lines += ["", (f"Paper estimate from the model card's {CARD_MS_A100} ms/image (BiRefNet Swin-L fp16, batch 1, "
              "A100), one model actor per GPU, decode/encode on the nodes' CPUs keeping up:"), "",
              *paper_estimate(overhead)]
    if args.serve:
        load = serve_load(args.clients, args.requests, max_batch=8)
        lines += ["", (f"- serve load: {load['clients']} clients x {load['requests']} requests (u2netp, 32-60 px "
                      f"patches, --max-batch 8, 1 replica): {load['wall']:.1f} s, {load['rate']:.1f} requests/s, "
                      f"latency p50 {load['p50']:.2f} s, p95 {load['p95']:.2f} s; errors or cross-talk: "
                      f"{load['errors']} {load['first_problems']}; "
                      f"replica peak RSS {load['replica_peak_mib']:.0f} MiB")]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as results:
            results.write(text)
    print(json.dumps({"overhead": overhead}))


if __name__ == "__main__":
    main()
