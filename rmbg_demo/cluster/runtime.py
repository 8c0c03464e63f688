"""Connecting to Ray: an existing cluster, or a local instance started for this command."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

EXTRA_HINT = "pip install 'rmbg-demo[ray]'"


class RayMissingError(RuntimeError):
    """Ray (or one of its extras) is not installed."""


def import_ray():
    """`ray`, or an error that says which extra to install."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayMissingError(f"--ray and `rmbg serve` need Ray ({exc.name} is missing): {EXTRA_HINT}") from None
    return ray


def runtime_env() -> dict:
    """Ships this copy of rmbg_demo to the workers, so they run the driver's code even where another
    version (or none) is installed. Models, weights and Python packages must be on every node."""
    package = Path(__file__).resolve().parents[1]
    return {"py_modules": [str(package)], "excludes": ["data/", "__pycache__/", "*.pyc"]}


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Connects to Ray; returns True when this call started a local instance (the caller shuts it down).

    address None or "": RAY_ADDRESS if set, else a new local instance. "auto", "HOST:PORT" and
    "ray://HOST:PORT" as `ray.init` reads them. Already connected (a test, a notebook): used as is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address in (None, "local")
    kwargs = {"num_cpus": num_cpus, "include_dashboard": False} if local else {}
    ray.init(address=None if local else address, runtime_env=runtime_env(), log_to_driver=not quiet,
             **kwargs)
    return local


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False):
    """`ray`, connected for the block (`connect`'s rules); a local instance started here is shut down
    after it, however the block ends. For `rmbg remove --ray` and `rmbg serve` alike."""
    ray = import_ray()
    started_here = connect(address, num_cpus=num_cpus, quiet=quiet)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def cluster_gpus() -> float:
    ray = import_ray()
    return float(ray.cluster_resources().get("GPU", 0))
