"""Masks from two checkouts of this project, compared pixel for pixel: a refactor must not move them.

    python bench/masks_identical.py --other ../old-checkout [--size 256] [--no-append]

Runs every registered model (torch models with the parity fixture's weights, at --size to keep
the CPU time small; the embedded model as is) over the built-in benchmark images, in this
checkout and in --other (each in its own interpreter, same API), and reports the largest
difference per model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, report  # noqa: E402

MODELS = ("rmbg-2.0", "birefnet-lite", "rmbg-1.4", "u2netp")

# Run inside each checkout: only API both versions share.
WORKER = """
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests/fixtures/rmbg2")
import parity
from rmbg_demo import build_model
from rmbg_demo.pipeline import RemovalPipeline
size, out = int(sys.argv[2]), sys.argv[3]
images = sorted(Path(sys.argv[1], "rmbg_demo/data/benchmark/images").glob("*.jpg"))
masks = {}
for name in json.loads(sys.argv[4]):
    if name == "u2netp":
        pipeline = RemovalPipeline(name, device="cpu")
    else:
        network = build_model(name)
        network.load_state_dict(parity.deterministic_state_dict(network), strict=False)
        pipeline = RemovalPipeline(name, network=network, device="cpu", dtype="float32", input_size=(size, size))
    for path in images:
        masks[f"{name}/{path.name}"] = np.asarray(pipeline(path).mask)
np.savez(out, **masks)
"""


def masks_of(checkout: Path, size: int, models) -> dict[str, np.ndarray]:
    out = Path(tempfile.mkdtemp()) / "masks.npz"
    subprocess.run([sys.executable, "-c", WORKER, str(checkout), str(size), str(out), json.dumps(models)],
                   check=True, cwd=checkout)
    with np.load(out) as data:
        return dict(data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", type=Path, required=True, help="another checkout (e.g. git worktree add ... OLD)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    ours, theirs = masks_of(ROOT, args.size, args.models), masks_of(args.other.resolve(), args.size, args.models)
    assert ours.keys() == theirs.keys()
    rows = []
    for model in args.models:
        keys = [k for k in ours if k.startswith(model + "/")]
        diffs = [np.abs(ours[k].astype(int) - theirs[k].astype(int)) for k in keys]
        identical = sum(int(d.max() == 0) for d in diffs)
        rows.append(f"| {model} | {len(keys)} | {identical} | {max(int(d.max()) for d in diffs)} | "
                    f"{np.mean([d.mean() for d in diffs]):.4f} |")
    report("\n".join([
        f"## {datetime.date.today()} masks of this checkout vs {args.other}",
        f"- command: `python bench/masks_identical.py {' '.join(sys.argv[1:])}`; built-in benchmark images; "
        f"torch models with the parity fixture's weights at {args.size}x{args.size}, float32 on the CPU",
        "",
        "| model | images | identical | max difference /255 | mean difference /255 |",
        "|---|---|---|---|---|",
        *rows,
    ]), append=not args.no_append)


if __name__ == "__main__":
    main()
