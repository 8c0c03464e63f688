"""Front ends beyond one machine, on Ray: `rmbg remove --ray` (Ray Data) and `rmbg serve` (Ray Serve).

Importing this package does not import Ray; the entry points do, and say which extra to install
(`pip install 'rmbg-demo[ray]'`) when it is missing. `manifest` and `storage` need no Ray."""
from __future__ import annotations


def add_ray_arguments(parser) -> None:
    from .job import add_ray_arguments as add

    add(parser)


def run_ray_job(args) -> int:
    from .job import run_ray_job as run

    return run(args)


def add_serve_parser(subparsers):
    from .serve import add_serve_parser as add

    return add(subparsers)


def run_serve(args) -> int:
    from .serve import run_serve as run

    return run(args)


__all__ = ["add_ray_arguments", "add_serve_parser", "run_ray_job", "run_serve"]
