"""How long `python app.py` takes to answer on a fresh machine with no network, as a user
starts it: no HF_HUB_OFFLINE, no token, an empty Hugging Face cache, the real hub address
(unreachable here). Median of --runs; --app times another checkout's app.py (before/after).

    python bench/startup.py [--runs 3] [--app OTHER/app.py] [--no-append]
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, report  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_start(app: Path, timeout: float = 600) -> tuple[float, int]:
    """Seconds until the page answers, and how many hub warnings the app printed meanwhile."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "RMBG_WEIGHTS"}
    env.update(HF_HUB_CACHE=tempfile.mkdtemp(prefix="hf-cache-"), GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=str(app.parent))
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(app), "--port", str(port)], cwd=app.parent, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        while time.perf_counter() - started < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    elapsed = time.perf_counter() - started
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise TimeoutError(f"{app} did not answer in {timeout} s")
    finally:
        process.terminate()
        process.wait(timeout=30)
    log.seek(0)
    warnings = sum("huggingface" in line.lower() and ("retry" in line.lower() or "error" in line.lower())
                   for line in log)
    return elapsed, warnings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--app", type=Path, default=ROOT / "app.py")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    runs = [time_start(args.app.resolve()) for _ in range(args.runs)]
    seconds = [s for s, _ in runs]
    report("\n".join([
        f"## {datetime.date.today()} app start-up with no network and no HF_HUB_OFFLINE ({args.app})",
        f"- command: `python bench/startup.py {' '.join(sys.argv[1:])}`",
        f"- page answered after (median of {args.runs}): **{statistics.median(seconds):.1f} s** "
        f"(runs: {', '.join(f'{s:.1f}' for s in seconds)}); hub error/retry lines printed: {runs[-1][1]}",
    ]), append=not args.no_append)


if __name__ == "__main__":
    main()
