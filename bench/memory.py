"""Memory under large images: 8 concurrent requests of a 6 KB, 7000x7000 (49 MP) 1-bit PNG against the
HTTP service (`rmbg serve`, its own process) and the page (app.py, through gradio_client), with the memory budget
off (--max-memory 0: every request at once, as before the budget) and on (the default, a quarter of RAM).

    python bench/memory.py [--requests 8] [--only service|page] [--no-append]

Reports per process: RSS idle (warm), peak (VmHWM) and RSS 20 s after the last answer,
in MiB, and how many requests were answered 200 / refused. u2netp, so the network is not what costs.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, report  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from helpers import AppServer, free_port  # noqa: E402

SIDE = 7000


def big_png() -> bytes:
    image = Image.new("1", (SIDE, SIDE))
    image.paste(1, (SIDE // 4, SIDE // 4, 3 * SIDE // 4, 3 * SIDE // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.open(ROOT / "assets" / "chelsea.jpg").save(buffer, "PNG")
    return buffer.getvalue()


def measure(pid: int, send, warm, requests: int) -> dict:
    """Idle is measured once the server is warm: 20 small requests one after another, then `requests` at once
    (its threads and their heaps exist). One request is not enough: the engine's working memory (ONNX
    Runtime's arena, kept between runs because it makes them 1.45x faster) grows by ~200 MB over the first
    few runs whatever the image, and a first burst of concurrent requests adds the threads' heaps."""
    for _ in range(20):
        warm()
    with ThreadPoolExecutor(requests) as pool:
        list(pool.map(lambda _: warm(), range(requests)))
    time.sleep(2)
    idle = status_mib(pid, "VmRSS")
    with ThreadPoolExecutor(requests) as pool:
        statuses = list(pool.map(send, range(requests)))
    time.sleep(20)  # past the budget's later trims (2 s and 15 s after the last large request)
    return {"idle": idle, "peak": status_mib(pid, "VmHWM"), "after": status_mib(pid, "VmRSS"),
            "ok": statuses.count(200), "refused": len(statuses) - statuses.count(200)}


def service_run(budget: int | None, data: bytes, requests: int) -> dict:
    """`rmbg serve` (the plain server) as a user starts it, in its own process."""
    import os
    import subprocess

    port = free_port()
    command = [sys.executable, "-m", "rmbg_demo", "serve", "--model", "u2netp", "--port", str(port),
               "--max-batch", "8", "--max-upload-mb", "25", *(["--max-memory", str(budget)] if budget is not None
                                                             else [])]
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)

        def post(body: bytes) -> int:
            request = urllib.request.Request(f"{url}/remove", data=body, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=900) as response:
                    response.read()
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        return measure(server.pid, lambda _: post(data), lambda: post(small_png()), requests)
    finally:
        server.terminate()
        server.wait(60)


def page_run(budget: str, data: bytes, requests: int) -> dict:
    from gradio_client import Client, handle_file

    path = OUT / "big-49mp.png"
    path.write_bytes(data)
    app = AppServer("--max-memory", budget, "--model", "u2netp").wait()
    try:
        client = Client(app.url, verbose=False)

        def send(source) -> int:
            try:
                client.predict(handle_file(str(source)), api_name="/image")
                return 200
            except Exception:  # noqa: BLE001 - a refusal reaches the client as an error
                return 503

        return measure(app.process.pid, lambda _: send(path), lambda: send(ROOT / "assets" / "chelsea.jpg"),
                       requests)
    finally:
        app.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--only", choices=["service", "page"])
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    data = big_png()
    from rmbg_demo.budget import default_budget

    rows = []
    if args.only in (None, "service"):
        for label, budget in (("off (0)", 0), (f"default ({default_budget() / 2**30:.1f} GiB)", None)):
            rows.append(("rmbg serve", label, service_run(budget, data, args.requests)))
    if args.only in (None, "page"):
        for label, budget in (("off (0)", "0"), (f"default ({default_budget() / 2**30:.1f} GiB)", "")):
            rows.append(("page (app.py)", label, page_run(budget, data, args.requests)))
    cpu = platform.processor() or platform.machine()
    lines = [f"### Memory under {args.requests} concurrent 49 MP requests ({datetime.date.today()}, {cpu}, "
             f"{len(data) / 1024:.0f} KB PNG of {SIDE}x{SIDE})", "",
             "`python bench/memory.py` (u2netp; RSS in MiB: idle once warm, peak VmHWM, 20 s after)", "",
             "| process | budget | idle | peak | after | answered | refused |", "|---|---|---|---|---|---|---|"]
    for process, label, row in rows:
        lines.append(f"| {process} | {label} | {row['idle']:.0f} | {row['peak']:.0f} | {row['after']:.0f} | "
                     f"{row['ok']} | {row['refused']} |")
    report("\n".join(lines), append=not args.no_append)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
