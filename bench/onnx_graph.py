"""Exported BiRefNet graphs: files, size, nodes, export time and ONNX Runtime's session start, beside an older commit.

    python bench/onnx_graph.py [--models birefnet-lite rmbg-2.0] [--size 256] [--runs 3]
                               [--against REV] [--float16] [--no-append]

For each model (parity fixture weights: graph and timing do not depend on weight values) the
network is exported at --size without the export's own check into a folder of its own, the
files it left there are counted and weighed (MB = 10^6 bytes), its nodes are counted, and an
ONNX Runtime CPU session is opened --runs times (the median is reported). With --against, the
same measurement runs on REV's code (a temporary git worktree, imported in a child process)
right after, so both columns come from one run on one machine. --float16 adds float16 exports.
Results are printed and appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(code_root: Path, models: list[str], size: int, runs: int, dtypes: list[str]) -> list[dict]:
    """Export and open each model with the rmbg_demo found at `code_root`."""
    sys.path[:0] = [str(code_root), str(code_root / "tests" / "fixtures" / "rmbg2")]
    import onnx
    import onnxruntime as ort
    import parity

    import rmbg_demo
    from rmbg_demo import build_model
    from rmbg_demo.export import export_onnx

    assert Path(rmbg_demo.__file__).resolve().is_relative_to(code_root.resolve()), rmbg_demo.__file__
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            network = build_model(name)
            network.load_state_dict(parity.deterministic_state_dict(network), strict=False)
            for dtype in dtypes:
                path = Path(folder) / f"{name}-{dtype}" / "model.onnx"
                path.parent.mkdir()
                started = time.perf_counter()
                export_onnx(name, path, network=network.eval(), size=size, dtype=dtype, check=False)
                export_s = time.perf_counter() - started
                files = list(path.parent.iterdir())  # older commits left external data files beside the model
                graph = onnx.load(str(path), load_external_data=False).graph
                kinds = collections.Counter(node.op_type for node in graph.node)
                opens = []
                for _ in range(runs):
                    started = time.perf_counter()
                    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    opens.append(time.perf_counter() - started)
                rows.append({"model": name, "dtype": dtype, "files": len(files),
                             "mb": sum(f.stat().st_size for f in files) / 1e6, "export_s": export_s,
                             "nodes": len(graph.node),
                             "shape_nodes": sum(kinds[k] for k in ("Shape", "Gather", "Unsqueeze", "Concat",
                                                                   "Range", "ScatterND", "ConstantOfShape")),
                             "open_s": statistics.median(opens), "opens": opens})
                for file in files:
                    file.unlink()
    return rows


def measure_at(rev: str, args) -> list[dict]:
    """The same measurement on commit `rev`'s code, in a child process (a fresh import of rmbg_demo)."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
        try:
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(tree), "--models", *args.models, "--size", str(args.size),
                 "--runs", str(args.runs), *(["--float16"] if args.float16 else [])],
                capture_output=True, text=True, check=False)
            if child.returncode:
                raise SystemExit(f"measuring {rev} failed:\n{child.stderr[-3000:]}")
            return json.loads(child.stdout.splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def cell(row: dict, old: dict | None, key: str, digits: int) -> str:
    """`now`, or `before → now (ratio)` beside the older commit."""
    def show(value):
        return f"{value:.{digits}f}" if digits else str(value)

    if old is None:
        return show(row[key])
    return f"{show(old[key])} → {show(row[key])}" + (f" ({old[key] / row[key]:.1f}x)" if row[key] else "")


def table(ours: list[dict], theirs: list[dict] | None, rev: str | None) -> str:
    lines = ["| model | dtype | files | MB | nodes | shape nodes | export s | session open s (median) |",
             "|---|---|---|---|---|---|---|---|"]
    before = {(r["model"], r["dtype"]): r for r in theirs or []}
    for row in ours:
        old = before.get((row["model"], row["dtype"]))
        lines.append(f"| {row['model']} | {row['dtype']} | {cell(row, old, 'files', 0)} | {cell(row, old, 'mb', 1)} | "
                     f"{cell(row, old, 'nodes', 0)} | "
                     f"{cell(row, old, 'shape_nodes', 0)} | {cell(row, old, 'export_s', 1)} | "
                     f"{cell(row, old, 'open_s', 2)} |")
    if rev:
        lines.append(f"\n(before → now: {rev} → the working tree)")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name, as `lscpu` shows it."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["birefnet-lite", "rmbg-2.0"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="also measure this commit's code, for a before/after")
    parser.add_argument("--float16", action="store_true", help="float16 exports too")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--child", metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = ["float32", "float16"] if args.float16 else ["float32"]
    if args.child:
        print(json.dumps(measure(Path(args.child), args.models, args.size, args.runs, dtypes)))
        return
    theirs = measure_at(args.against, args) if args.against else None
    ours = measure(ROOT, args.models, args.size, args.runs, dtypes)
    load = os.getloadavg()[0]
    text = (f"\n## Exported graphs at {args.size}x{args.size}, {datetime.date.today()}\n\n"
            f"`python bench/onnx_graph.py {' '.join(sys.argv[1:])}` on {cpu_name()} "
            f"({os.cpu_count()} cores, load average {load:.1f} after); parity fixture weights; export without "
            f"its check; ONNX Runtime CPU session opened {args.runs} times.\n\n{table(ours, theirs, args.against)}\n")
    print(text)
    if not args.no_append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
