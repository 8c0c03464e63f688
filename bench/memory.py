"""Memory under large images: 8 concurrent requests of a 6 KB, 7000x7000 (49 MP) 1-bit PNG against the
HTTP service (a Ray Serve replica) and the page (app.py, through gradio_client), with the memory budget
off (--max-memory 0: every request at once, as before the budget) and on (the default, a quarter of RAM).

    python bench/memory.py [--requests 8] [--only service|page] [--no-append]

Reports per process: RSS idle (model loaded), peak (VmHWM) and RSS a few seconds after the last answer,
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


def replica_pid() -> int:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ServeReplica" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise RuntimeError("no Serve replica process found")


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.open(ROOT / "assets" / "chelsea.jpg").save(buffer, "PNG")
    return buffer.getvalue()


def measure(pid: int, send, warm, requests: int) -> dict:
    """Idle is measured after one small request: the engine's own working memory (ONNX Runtime's arena,
    ~460 MB for u2netp, kept between runs because it makes them 1.45x faster) is there whatever the image."""
    warm()
    time.sleep(2)
    idle = status_mib(pid, "VmRSS")
    with ThreadPoolExecutor(requests) as pool:
        statuses = list(pool.map(send, range(requests)))
    time.sleep(5)
    return {"idle": idle, "peak": status_mib(pid, "VmHWM"), "after": status_mib(pid, "VmRSS"),
            "ok": statuses.count(200), "refused": len(statuses) - statuses.count(200)}


def service_run(budget: int | None, data: bytes, requests: int) -> dict:
    from ray import serve

    from rmbg_demo.cluster.serve import ServeSettings, start_service

    settings = ServeSettings(model="u2netp", max_batch=8, max_bytes=25 * 2**20, max_memory=budget)
    url = start_service(settings, port=free_port(), max_queued=64)
    try:
        def post(body: bytes) -> int:
            request = urllib.request.Request(f"{url}/remove", data=body, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=900) as response:
                    response.read()
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        return measure(replica_pid(), lambda _: post(data), lambda: post(small_png()), requests)
    finally:
        serve.shutdown()


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
        from rmbg_demo.cluster.runtime import connect

        connect(None, quiet=True)
        for label, budget in (("off (0)", 0), (f"default ({default_budget() / 2**30:.1f} GiB)", None)):
            rows.append(("service replica", label, service_run(budget, data, args.requests)))
    if args.only in (None, "page"):
        for label, budget in (("off (0)", "0"), (f"default ({default_budget() / 2**30:.1f} GiB)", "")):
            rows.append(("page (app.py)", label, page_run(budget, data, args.requests)))
    cpu = platform.processor() or platform.machine()
    lines = [f"### Memory under {args.requests} concurrent 49 MP requests ({datetime.date.today()}, {cpu}, "
             f"{len(data) / 1024:.0f} KB PNG of {SIDE}x{SIDE})", "",
             "`python bench/memory.py` (u2netp; RSS in MiB: idle with the model loaded, peak VmHWM, 5 s after)", "",
             "| process | budget | idle | peak | after | answered | refused |", "|---|---|---|---|---|---|---|"]
    for process, label, row in rows:
        lines.append(f"| {process} | {label} | {row['idle']:.0f} | {row['peak']:.0f} | {row['after']:.0f} | "
                     f"{row['ok']} | {row['refused']} |")
    report("\n".join(lines), append=not args.no_append)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
