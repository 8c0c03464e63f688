"""`rmbg serve --ray`: the service's app (`rmbg_demo.service.app`: its routes and contract) deployed on
Ray Serve, with replicas (a fixed number, or autoscaled on requests in flight) and `@serve.batch`."""
from __future__ import annotations

import sys
import time

from ..service.plain import DEFAULT_PORT
from ..service.settings import ServeSettings

__all__ = ["DEFAULT_PORT", "ServeSettings", "replica_options", "run_serve", "start_service"]


def replica_options(replicas: str | int, gpus_in_cluster: float, max_batch: int, max_queued: int,
                    num_cpus: float | None = None) -> dict:
    """Deployment options: a fixed number of replicas, or autoscaling on requests in flight; one GPU per
    replica where the cluster has GPUs."""
    options: dict = {"max_ongoing_requests": max(2 * max_batch, 2), "max_queued_requests": max_queued,
                     "ray_actor_options": {"num_gpus": 1 if gpus_in_cluster else 0,
                                           "num_cpus": num_cpus if num_cpus is not None else (0 if gpus_in_cluster
                                                                                              else 1)}}
    if str(replicas) == "auto":
        top = max(1, int(gpus_in_cluster)) if gpus_in_cluster else 4
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": top,
                                         "target_ongoing_requests": max(1, max_batch)}
    else:
        try:
            count = int(replicas)
        except ValueError:
            raise ValueError(f"--replicas takes a number or 'auto', not {replicas!r}") from None
        if count < 1:
            raise ValueError("--replicas must be at least 1")
        options["num_replicas"] = count
    return options


def start_service(settings, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, replicas="1",
                  max_queued: int | None = None, num_cpus: float | None = None, name: str = "rmbg") -> str:
    """Deploys the service on the connected Ray and returns its base URL (blocks until replicas are ready)."""
    from ray import serve

    from .runtime import cluster_gpus
    from .serve_app import Remover

    serve.start(http_options={"host": host, "port": port})
    queued = settings.max_queued if max_queued is None else max_queued
    options = replica_options(replicas, cluster_gpus(), settings.max_batch, queued, num_cpus)
    serve.run(Remover.options(**options).bind(settings), name=name, route_prefix="/")
    return f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"


def run_serve(settings: ServeSettings, *, address: str | None = None, host: str = "127.0.0.1",
              port: int = DEFAULT_PORT, replicas="1") -> int:
    """`rmbg serve --ray`: deploys the service and waits for Ctrl-C; 2 when it cannot start."""
    from .runtime import RayMissingError, import_ray, ray_session

    try:
        import_ray()
        from ray import serve
    except RayMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with ray_session(address) as _:
            try:
                url = start_service(settings, host=host, port=port, replicas=replicas)
                print(f"serving on {url} (Ray Serve): POST {url}/remove, POST {url}/v1.0/removebg, GET {url}/docs "
                      "(Ctrl-C stops)", file=sys.stderr)
                while True:
                    time.sleep(3600)
            finally:
                serve.shutdown()
    except KeyboardInterrupt:
        return 0
    except (ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
