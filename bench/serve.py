"""`rmbg serve` (uvicorn in one process) against `rmbg serve --ray` (Ray Serve) under the same load.

Each server is started as a user starts it (its own process, u2netp, on 127.0.0.1), warmed up, then C clients
send R requests each of distinct colour patches (every answer's size and centre colour checked); requests/s,
p50/p95 latency, errors, and the memory of every process involved (the server's process tree: for Ray, its
raylet, GCS, dashboard, proxy and replica), idle and at its peak under load. The two servers take turns for
`--runs` rounds; medians. `--hostile N` also sends N hostile requests to the plain server and reports its
memory before and after. Appends to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def patch(colour, size) -> bytes:
    width, height = size
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[height // 4:height * 3 // 4, width // 4:width * 3 // 4] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`rmbg serve [--ray]` in its own process group; `.tree_rss_mib()` sums every process it started."""

    def __init__(self, ray: bool, max_batch: int):
        self.port = free_port()
        command = [sys.executable, "-m", "rmbg_demo", "serve", "--model", "u2netp", "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-queued", "256", *(["--ray"] if ray else [])]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=2)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def processes(self) -> list[psutil.Process]:
        """The server and everything it started (Ray's daemons re-parent to init, so also by session)."""
        session = os.getsid(self.process.pid)
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                if os.getsid(process.pid) == session:
                    found.append(process)
            except (OSError, psutil.Error):
                continue
        return found

    def tree_rss_mib(self) -> float:
        total = 0
        for process in self.processes():
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20

    def stop(self) -> None:
        processes = self.processes()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            pass
        for process in processes:
            try:
                process.kill()
            except psutil.Error:
                pass


def load(url: str, clients: int, requests: int) -> dict:
    latencies, problems, lock = [], [], threading.Lock()

    def client(index: int) -> None:
        for request in range(requests):
            colour = ((37 * index + 11 * request) % 256, (91 * request + 50) % 256, (23 * index + 160) % 256)
            size = (32 + 4 * index, 24 + (request % 16))
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/remove", data=patch(colour, size),
                                                                   method="POST"), timeout=300) as response:
                    cut = Image.open(io.BytesIO(response.read()))
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
    return {"rate": len(latencies) / wall, "p50": ordered[len(ordered) // 2],
            "p95": ordered[max(0, int(len(ordered) * 0.95) - 1)], "errors": len(problems)}


def measured(ray: bool, clients: int, requests: int, max_batch: int) -> dict:
    server = Server(ray, max_batch)
    try:
        load(server.url, 2, 5)  # warm-up: the first batches, the threads
        idle = server.tree_rss_mib()
        peak, done = [idle], threading.Event()

        def sample():
            while not done.wait(0.5):
                peak.append(server.tree_rss_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        found = load(server.url, clients, requests)
        done.set()
        sampler.join()
        return {**found, "idle_mib": idle, "peak_mib": max(peak), "processes": len(server.processes())}
    finally:
        server.stop()


def hostile_memory(count: int) -> tuple[float, float, int]:
    """The plain server's RSS after 100 hostile requests and after `count` more; and how many were not 4xx."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from helpers import bomb_png

    server = Server(False, 8)
    bodies = [(b"not an image", "application/octet-stream"), (bomb_png(100_000, 100_000), "image/png"),
              (b"--b\r\nbroken", "multipart/form-data; boundary=b"), (b'{"url": "http://10.0.0.1/x.png"}',
                                                                      "application/json")]
    wrong = 0

    def send(index: int) -> None:
        nonlocal wrong
        body, kind = bodies[index % len(bodies)]
        try:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/remove?size=320", data=body,
                                                          headers={"Content-Type": kind}), timeout=60)
            wrong += 1
        except urllib.error.HTTPError as exc:
            wrong += not 400 <= exc.code < 500

    try:
        for index in range(100):
            send(index)
        before = server.tree_rss_mib()
        for index in range(count):
            send(index)
        return before, server.tree_rss_mib(), wrong
    finally:
        server.stop()


def cpu() -> str:
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor())
    return f"{name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--hostile", type=int, default=0, metavar="N")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rounds: dict[str, list[dict]] = {"plain": [], "ray": []}
    for _ in range(args.runs):
        for name in rounds:
            rounds[name].append(measured(name == "ray", args.clients, args.requests, args.max_batch))
            print(name, rounds[name][-1], flush=True)
    lines = [f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC rmbg serve: plain vs --ray ({cpu()})",
             f"- command: `python bench/serve.py {' '.join(sys.argv[1:])}`",
             f"- {args.clients} clients x {args.requests} requests of distinct colour patches (32-60 x 24-39 px), "
             f"u2netp, --max-batch {args.max_batch}; medians of {args.runs} alternating rounds, each server a fresh "
             "process tree; memory: RSS summed over every process of the server's session",
             "", "| server | requests/s | p50 s | p95 s | errors | processes | idle MiB | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, found in rounds.items():
        median = {key: statistics.median(run[key] for run in found) for key in found[0]}
        lines.append(f"| `rmbg serve{' --ray' if name == 'ray' else ''}` | {median['rate']:.2f} | {median['p50']:.3f} "
                     f"| {median['p95']:.3f} | {median['errors']:.0f} | {median['processes']:.0f} | "
                     f"{median['idle_mib']:.0f} | {median['peak_mib']:.0f} |")
    plain_rate = statistics.median(run["rate"] for run in rounds["plain"])
    ray_rate = statistics.median(run["rate"] for run in rounds["ray"])
    lines.append(f"\nplain / --ray requests/s: {plain_rate / ray_rate:.2f}x")
    if args.hostile:
        before, after, wrong = hostile_memory(args.hostile)
        lines.append(f"\nHostile requests to the plain server (not an image, a 100000x100000 PNG bomb, broken "
                     f"multipart, a private URL, in turn): RSS {before:.0f} MiB after 100, {after:.0f} MiB after "
                     f"{args.hostile} more ({after - before:+.0f} MiB); answers that were not 4xx: {wrong}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as results:
            results.write(text)


if __name__ == "__main__":
    main()
