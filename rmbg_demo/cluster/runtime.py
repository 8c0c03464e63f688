"""Connecting to Ray: an existing cluster, or a local instance started for this command."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

EXTRA_HINT = "pip install 'rmbg-demo[ray]'"
log = logging.getLogger(__name__)


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
    already = _descendants(os.getpid())  # this process's own children are not Ray's
    started_here = connect(address, num_cpus=num_cpus, quiet=quiet)
    try:
        yield ray
    finally:
        if started_here:
            shutdown_local(ray, exclude=already)


def shutdown_local(ray, grace: float = 10.0, exclude: set[int] = frozenset()) -> None:
    """`ray.shutdown()`, then waits for every process the local instance started (this process's
    descendants but `exclude`, those it had before Ray: raylet, GCS, workers, and the dashboard and
    runtime-env agents, which sometimes outlive it by minutes ignoring SIGTERM); what is still there after
    `grace` seconds is killed, and the log says so."""
    started = _descendants(os.getpid()) - set(exclude)
    ray.shutdown()
    deadline = time.monotonic() + grace
    while (alive := {pid for pid in started if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if alive:
        log.info("Ray left %d process(es) running %.0f s after its shutdown; stopped them", len(alive), grace)


def _parents() -> dict[int, int]:
    """pid -> parent pid, from /proc (Linux); empty elsewhere."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cluster_gpus() -> float:
    ray = import_ray()
    return float(ray.cluster_resources().get("GPU", 0))
