"""`rmbg serve` on one machine: the app run by uvicorn in this process, no Ray. Concurrent requests share
network batches through the pool's `RequestBatcher` (up to --max-batch images)."""
from __future__ import annotations

import logging
import sys
import threading
import time

from .settings import ServeSettings

DEFAULT_PORT = 8000


def build_app(settings: ServeSettings):
    from .app import create_app
    from .core import Service

    return create_app(Service(settings, request_batch=settings.max_batch))


def _config(app, host: str, port: int):
    import uvicorn

    # Our access log (rmbg_demo.access, JSON) replaces uvicorn's; keep-alive short so idle clients free sockets
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                          timeout_keep_alive=5, server_header=False)


class ServiceThread:
    """The plain server on a background thread of this process (tests, benchmarks): `.url`, `.stop()`."""

    def __init__(self, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.app = build_app(settings)
        self._socket = socket.socket()
        self._socket.bind((host, port))  # port 0: the OS picks a free one, held until uvicorn takes it
        self.url = f"http://{host}:{self._socket.getsockname()[1]}"
        self.server = uvicorn.Server(_config(self.app, host, self._socket.getsockname()[1]))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="rmbg-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.02)

    @property
    def service(self):
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._socket.close()


def serve_here(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
    """Runs the service until Ctrl-C; 2 when it cannot start."""
    import uvicorn

    _log_access_to_stderr()
    try:
        app = build_app(settings)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}"
    server = uvicorn.Server(_config(app, host, port))

    def announce():  # once the port is bound, so that "serving" means it answers
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"serving {app.state.service.default_model} on {url}: POST {url}/remove, POST {url}/v1.0/removebg,"
                  f" GET {url}/docs (Ctrl-C stops)", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    return 0 if server.started else 2


def _log_access_to_stderr() -> None:
    """The CLI shows the access log (JSON lines) on stderr; a library user configures logging themselves."""
    access = logging.getLogger("rmbg_demo.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
