"""A client for a running `rmbg serve`, for the Gradio page (`python app.py --backend http://HOST:PORT`) and scripts.

Standard library only: no Ray needed on the machine that sends the work."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message


class RemoteError(RuntimeError):
    """The service refused the image or failed; `status` is the HTTP status (400 bad image, 413, 503 busy...),
    None when it could not be reached."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


class RemoteRemover:
    """`RemoteRemover("http://127.0.0.1:8000").remove(png_bytes, background="#00ff00")` -> (image bytes, headers)."""

    def __init__(self, url: str, *, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def remove(self, image: bytes, *, model: str | None = None, background: str | None = None,
               format: str = "png", refine: bool = False, mask: bool = False,
               size: str | None = None) -> tuple[bytes, Message]:
        """The cut-out (or, with `mask`, the mask) of `image`, encoded as `format`, and the answer's headers
        (X-Model: the model that ran; X-Network-Size: the resolution it ran at (`size`, "N" or "WxH", default
        the model's own); X-Seconds, Server-Timing: where the time went)."""
        query = {"format": format}
        if model:
            query["model"] = model
        if size and size != "auto":
            query["size"] = size
        if background:
            query["background"] = background
        if refine:
            query["refine"] = "1"
        if mask:
            query["mask"] = "1"
        request = urllib.request.Request(f"{self.url}/remove?{urllib.parse.urlencode(query)}", data=bytes(image),
                                         method="POST", headers={"Content-Type": "application/octet-stream"})
        return self._send(request)

    def remove_url(self, url: str, **settings) -> tuple[bytes, Message]:
        """The same for an image the service fetches itself (under its SSRF rules)."""
        query = {k: ("1" if v is True else v) for k, v in settings.items() if v not in (None, False)}
        request = urllib.request.Request(f"{self.url}/remove?{urllib.parse.urlencode(query)}",
                                         data=json.dumps({"url": url}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._send(request)

    def models(self) -> dict:
        """GET /models: {"default": name, "batch": N, "models": [{"name", "title", "licence", "available"}]}."""
        return json.loads(self._send(urllib.request.Request(f"{self.url}/models"))[0])

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=min(self.timeout, 5.0)) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _send(self, request) -> tuple[bytes, Message]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(), response.headers  # case-insensitive: headers["X-Model"]
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = body.decode(errors="replace")[:200] or exc.reason
            raise RemoteError(f"{self.url} answered {exc.code}: {message}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out: no answer at all
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"cannot reach {self.url}: {reason}", None) from None
