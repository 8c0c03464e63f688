"""What a Ray model actor needs: peak resident memory of a fresh process that builds each registered model's
engine (parity-fixture weights for the torch models) and runs one image at the model's own size, on the CPU.
`ModelSpec.actor_memory_mb` (the reservation `rmbg remove --ray` asks Ray for) comes from these figures.

    python bench/actor_memory.py [--models u2netp birefnet-lite ...] [--dtype float32] [--no-append]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, report  # noqa: E402

WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/bench")
import torch
from common import fixture_weights_file
from rmbg_demo.engines import build_engine
from rmbg_demo.models import Runtime, get_spec
spec = get_spec(sys.argv[2])
weights = None if spec.runtime is Runtime.ONNX else fixture_weights_file(spec.name)
engine = build_engine(spec, weights, "cpu", sys.argv[3])
engine(torch.zeros(1, 3, *spec.input_size))
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"model": spec.name, "peak_mib": peak / 1024, "spec_mib": spec.actor_memory_mb}))
"""


def main() -> None:
    from rmbg_demo.models import model_names

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=model_names())
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        run = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), name, args.dtype], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    lines = [f"### Model actor memory ({datetime.date.today()}, {platform.processor() or platform.machine()})", "",
             f"`python bench/actor_memory.py --dtype {args.dtype}`: peak RSS (VmHWM) of a fresh process that builds "
             "the engine and runs one image at the model's own size; the actor reserves `actor_memory_mb`", "",
             "| model | peak MiB | reserved MiB |", "|---|---|---|"]
    lines += [f"| {row['model']} | {row['peak_mib']:.0f} | {row['spec_mib']} |" for row in rows]
    report("\n".join(lines), append=not args.no_append)


if __name__ == "__main__":
    main()
