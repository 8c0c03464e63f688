"""`rmbg serve`: background removal as an HTTP API (FastAPI), run by uvicorn in this process (`plain.py`) or
deployed on Ray Serve (`rmbg_demo.cluster.serve`). `app.create_app` holds every route; `core.Service` the
models and limits; `access` the keys, rate limit, request IDs and access log; `removebg` remove.bg's API."""
from .settings import ServeSettings

__all__ = ["ServeSettings"]
