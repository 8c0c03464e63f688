"""A client for a running `rmbg serve`, for the Gradio page (`python app.py --backend http://HOST:PORT`),
`RemoteEngine` and scripts.

Standard library and numpy only: no Ray needed on the machine that sends the work."""
from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from email.message import Message

import numpy as np


class RemoteError(RuntimeError):
    """The service refused the image or failed; `status` is the HTTP status (400 bad image, 413, 503 busy...),
    None when it could not be reached."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


class RemoteRemover:
    """`RemoteRemover("http://127.0.0.1:8000").remove(png_bytes, background="#00ff00")` -> (image bytes, headers)."""

    def __init__(self, url: str, *, timeout: float = 120.0, api_key: str | None = None):
        """`api_key`: sent as X-Api-Key to a service that has keys (default: the RMBG_API_KEY variable)."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else os.environ.get("RMBG_API_KEY") or None

    def remove(self, image: bytes, options=None, **settings) -> tuple[bytes, Message]:
        """The cut-out (or, with mask, the mask) of `image`, encoded in the asked format, and the answer's
        headers (X-Model: the model that ran; X-Network-Size: the resolution it ran at; X-Seconds,
        Server-Timing: where the time went). The settings are a `RemovalOptions`, or its fields as
        keywords (model, size, background, refine, format, mask)."""
        from .request import RemovalOptions, background_bytes

        options = options or RemovalOptions(**settings)
        query = urllib.parse.urlencode(options.to_query())
        backdrop = background_bytes(options.background)
        if backdrop is None:
            body, kind = bytes(image), "application/octet-stream"
        else:  # the background image travels beside the photo
            body, kind = _multipart({"image": bytes(image), "background_image": backdrop})
        request = urllib.request.Request(f"{self.url}/remove?{query}", data=body, method="POST",
                                         headers={"Content-Type": kind})
        return self._send(request)

    def predict(self, batch: np.ndarray, model: str) -> np.ndarray:
        """The network alone, run by the service: (B, 3, H, W) float32 normalised input -> (B, 1, h, w)
        float32 probabilities (what every engine answers), sent and returned as .npy."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(batch, dtype=np.float32), allow_pickle=False)
        request = urllib.request.Request(f"{self.url}/predict?{urllib.parse.urlencode({'model': model})}",
                                         data=buffer.getvalue(), method="POST",
                                         headers={"Content-Type": "application/x-npy"})
        body, _ = self._send(request)
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except ValueError as exc:
            raise RemoteError(f"{self.url} answered something that is not an array: {exc}", None) from None

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
        if self.api_key:
            request.add_header("X-Api-Key", self.api_key)
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


def _multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body of file fields, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in fields.items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
