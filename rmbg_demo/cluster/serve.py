"""`rmbg serve`: background removal as an HTTP service on Ray Serve.

POST /remove (image bytes, multipart field `image`, or JSON {"url": ...}; query model, background,
format, refine, mask=1, size=N|WxH (the network's resolution; default the model's own)) answers the
image with X-Model and timing headers; GET /models, GET /healthz.
Bad input is a 400 {"error": ...}, an oversized body 413, a full queue 503; the service stays up.
"""
from __future__ import annotations

import sys
import time

DEFAULT_PORT = 8000


def add_serve_parser(subparsers):
    """Adds the `serve` subcommand to the CLI's subparsers; returns its parser."""
    from ..options import add_model_arguments

    serve = subparsers.add_parser("serve", help="an HTTP service on Ray Serve (POST /remove)",
                                  description="Runs until Ctrl-C. Needs: pip install 'rmbg-demo[ray]'")
    serve.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="the Ray cluster (default: RAY_ADDRESS, else a local Ray started here)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    add_model_arguments(serve)  # --model, --weights (a path every node sees), --device, --dtype
    serve.add_argument("--replicas", default="1", metavar="N|auto",
                       help="replicas of the model; auto: 1 to one per GPU (or 4), by requests in flight")
    serve.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests that share a network batch")
    serve.add_argument("--max-queued", type=int, default=64, metavar="N",
                       help="requests waiting per deployment beyond those being served; more get 503")
    serve.add_argument("--max-upload-mb", type=float, default=25.0, help="bigger bodies get 413")
    serve.add_argument("--allow-private-urls", action="store_true",
                       help="let {\"url\": ...} bodies reach private and loopback addresses")
    return serve


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
                  max_queued: int = 64, num_cpus: float | None = None, name: str = "rmbg") -> str:
    """Deploys the service on the connected Ray and returns its base URL (blocks until replicas are ready)."""
    from ray import serve

    from .runtime import cluster_gpus
    from .serve_app import Remover

    serve.start(http_options={"host": host, "port": port})
    options = replica_options(replicas, cluster_gpus(), settings.max_batch, max_queued, num_cpus)
    serve.run(Remover.options(**options).bind(settings), name=name, route_prefix="/")
    return f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"


def run_serve(args) -> int:
    from .runtime import RayMissingError, connect, import_ray

    try:
        ray = import_ray()
        from ray import serve

        from .serve_app import ServeSettings

        started_here = connect(args.ray)
    except (RayMissingError, ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = ServeSettings(model=args.model, weights=str(args.weights) if args.weights else None,
                             device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                             max_bytes=int(args.max_upload_mb * 1024 * 1024),
                             allow_private_urls=args.allow_private_urls)
    try:
        url = start_service(settings, host=args.host, port=args.port, replicas=args.replicas,
                            max_queued=args.max_queued)
        print(f"serving on {url}: POST {url}/remove, GET {url}/models, GET {url}/healthz (Ctrl-C stops)",
              file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()
