"""A soak test of the running app: 1,000+ requests from concurrent clients on 127.0.0.1, with the
app's resident memory and its temp folders' size sampled as they go, then after an idle spell
(so that Gradio's cache cleaning and our output pruning have run). The tests keep only what
must always hold (no errors, no cross-talk, temp files deleted eventually); the figures live here.

    python bench/soak.py [--requests 1000] [--clients 8] [--max-batch 4] [--every 100] [--idle 30] [--no-append]
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, report  # noqa: E402

ASSETS = ROOT / "assets"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def usage(folders) -> tuple[int, float]:
    """(files, MiB) under `folders`."""
    files = [p for folder in folders for p in Path(folder).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files) / 2**20


def inputs(folder: Path, count: int) -> list[Path]:
    """`count` different PNGs (crops of the photos, each its own size): no answer can pass for another's."""
    photos = [Image.open(ASSETS / n).convert("RGB") for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        crop = photo.crop((i % 40, i % 30, photo.width - 40 + i % 40, photo.height - 30 + i % 30))
        path = folder / f"in{i:04d}.png"
        crop.resize((160 + i % 200, 120 + (i * 7) % 90)).save(path)
        paths.append(path)
    return paths


def start_app(port: int, scratch: Path, max_batch: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "RMBG_WEIGHTS"}
    env.update(TMPDIR=str(scratch / "tmp"), GRADIO_TEMP_DIR=str(scratch / "gradio"), RMBG_DELETE_CACHE="5,10",
               RMBG_OUTPUT_MAX_AGE="10", HF_HUB_CACHE=str(scratch / "hf"), GRADIO_ANALYTICS_ENABLED="False")
    (scratch / "tmp").mkdir()
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--model", "u2netp",
                                "--max-batch", str(max_batch)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    for _ in range(900):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("the app did not answer")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--every", type=int, default=100, help="sample every N requests")
    parser.add_argument("--idle", type=float, default=30, help="seconds of idle before the last sample")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    scratch = Path(tempfile.mkdtemp(prefix="rmbg-soak-"))
    folders = [scratch / "tmp", scratch / "gradio"]
    images = inputs(Path(tempfile.mkdtemp(prefix="rmbg-soak-in-")), min(args.requests, 500))
    app = start_app(args.port, scratch, args.max_batch)
    samples, errors, crossed = [(0, rss_mib(app.pid), *usage(folders))], 0, 0
    started = time.perf_counter()
    try:
        clients = [Client(f"http://127.0.0.1:{args.port}/", verbose=False) for _ in range(args.clients)]

        def one(i):
            path = images[i % len(images)]
            try:
                cut = np.asarray(Image.open(clients[i % args.clients].predict(handle_file(str(path)),
                                                                              api_name="/image")[1]))
            except Exception:  # noqa: BLE001 - counted and reported
                return "error"
            return "ok" if np.array_equal(cut[..., :3], np.asarray(Image.open(path))) else "crossed"

        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            for start in range(0, args.requests, args.every):
                outcomes = list(pool.map(one, range(start, min(start + args.every, args.requests))))
                errors += outcomes.count("error")
                crossed += outcomes.count("crossed")
                samples.append((min(start + args.every, args.requests), rss_mib(app.pid), *usage(folders)))
                print(f"{samples[-1][0]} requests: RSS {samples[-1][1]:.0f} MiB, temp {samples[-1][2]} files "
                      f"{samples[-1][3]:.1f} MiB", flush=True)
        seconds = time.perf_counter() - started
        time.sleep(args.idle)
        clients[0].predict(handle_file(str(images[0])), api_name="/image")  # prunes our output folders
        time.sleep(1)
        idle = (rss_mib(app.pid), *usage(folders))
    finally:
        app.terminate()
        app.wait(timeout=30)
    rows = "\n".join(f"| {n} | {rss:.0f} | {files} | {mib:.1f} |" for n, rss, files, mib in samples)
    report("\n".join([
        f"## {datetime.date.today()} soak: {args.requests} requests, {args.clients} clients, u2netp, "
        f"--max-batch {args.max_batch}",
        f"- command: `python bench/soak.py {' '.join(sys.argv[1:])}`",
        f"- {args.requests / seconds:.1f} requests/s; errors: {errors}; answers that were another request's: {crossed}",
        "", "| requests | app RSS MiB | temp files | temp MiB |", "|---|---|---|---|", rows,
        f"| after {args.idle:g} s idle | {idle[0]:.0f} | {idle[1]} | {idle[2]:.1f} |",
    ]), append=not args.no_append)
    return 1 if errors or crossed else 0


if __name__ == "__main__":
    sys.exit(main())
