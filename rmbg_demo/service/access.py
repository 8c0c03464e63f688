"""Who may use the service and what each request did: API keys, a per-key rate limit, request IDs and one
JSON access-log line per request. One ASGI middleware, so the plain server and Ray Serve share it."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path

ACCESS_LOG = logging.getLogger("rmbg_demo.access")
log = logging.getLogger(__name__)
KEY_VARIABLE = "RMBG_API_KEYS"
# Routes anyone may call: the health check (for load balancers) and the API's own description.
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# A caller's X-Request-Id is kept when it is this tame (it goes into logs and headers); else a new one.
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@+=/-]{1,128}$")
_RATE_UNITS = {"s": 60, "sec": 60, "min": 1, "m": 1, "h": 1 / 60, "hour": 1 / 60}  # to per minute


# -- API keys -------------------------------------------------------------------------------------------------
def load_api_keys(keys=(), file: str | os.PathLike | None = None, environ: Mapping[str, str] = os.environ
                  ) -> tuple[str, ...]:
    """The keys from --api-key (repeatable), --api-keys FILE (one per line; blank lines and # comments
    skipped) and RMBG_API_KEYS (separated by commas or spaces), without duplicates."""
    found = [k.strip() for k in keys or () if k and k.strip()]
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-keys {os.fspath(file)}: cannot read it ({exc})") from None
        found += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"--api-keys {os.fspath(file)}: the file holds no key")
    found += re.split(r"[,\s]+", environ.get(KEY_VARIABLE, "").strip()) if environ.get(KEY_VARIABLE, "").strip() \
        else []
    short = [k for k in found if len(k) < 8]
    if short:
        raise ValueError(f"an API key must be at least 8 characters ({len(short)} shorter: too easy to guess)")
    return tuple(dict.fromkeys(found))


class ApiKeys:
    """Checks a presented key against every configured one in constant time (SHA-256 digests compared with
    `hmac.compare_digest`, all of them, whatever matched), so timing tells nothing about a key."""

    def __init__(self, keys=()):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._digests)} keys>)"

    def match(self, presented: str | None) -> int | None:
        """The index of the key presented (a name for logs and rate limits that is not the key), or None."""
        digest = hashlib.sha256((presented or "").encode()).digest()
        found = None
        for index, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known) and presented:
                found = index
        return found


def presented_key(headers: Mapping[str, str]) -> str | None:
    """remove.bg's `X-Api-Key: KEY`, or `Authorization: Bearer KEY`."""
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_host_warning(host: str) -> str | None:
    """The loud warning for a service reachable from other machines with no key, or None."""
    if is_loopback(host):
        return None
    return (f"WARNING: rmbg serve listens on {host} with no API key: anyone who reaches this port can use it "
            f"(and its CPU/GPU). Add one: --api-key KEY, --api-keys FILE or {KEY_VARIABLE}=KEY; "
            "clients send X-Api-Key: KEY or Authorization: Bearer KEY.")


# -- rate limit -----------------------------------------------------------------------------------------------
def parse_rate_limit(text: str | None) -> int | None:
    """'60/min' (also /s, /h; a bare number is per minute) -> requests per minute; None or '' -> no limit."""
    if text in (None, ""):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:/\s*([a-z]+))?\s*", str(text).lower())
    if not match or (match.group(2) and match.group(2) not in _RATE_UNITS):
        raise ValueError(f"--rate-limit {text!r}: write N/min (or N/s, N/h), e.g. 60/min")
    per_minute = int(match.group(1)) * _RATE_UNITS.get(match.group(2) or "min", 1)
    if per_minute < 1:
        raise ValueError(f"--rate-limit {text!r}: at least 1 request a minute")
    return math.floor(per_minute)


class RateLimiter:
    """At most `per_minute` requests per caller in any 60 s window (a sliding log of their times)."""

    WINDOW = 60.0

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[str, deque] = {}
        self._lock = threading.Lock()

    def admit(self, caller: str) -> float | None:
        """None when admitted (and counted); else the seconds until the caller may try again."""
        now = self.clock()
        with self._lock:
            times = self._seen.setdefault(caller, deque())
            while times and times[0] <= now - self.WINDOW:
                times.popleft()
            if len(times) >= self.per_minute:
                return max(0.0, times[0] + self.WINDOW - now)
            times.append(now)
            if len(self._seen) > 10_000:  # forget callers gone quiet, so the table cannot grow without bound
                self._seen = {k: v for k, v in self._seen.items() if v and v[-1] > now - self.WINDOW}
            return None


# -- the middleware -------------------------------------------------------------------------------------------
def error_body(path: str, message: str, code: str) -> dict:
    """Our routes answer {"error": message}; remove.bg's (/v1.0/...) its own {"errors": [{"title", "code"}]}."""
    if path.startswith("/v1.0/"):
        return {"errors": [{"title": message, "code": code}]}
    return {"error": message}


class AccessMiddleware:
    """For every request: an X-Request-Id (the caller's when sane, else a new one) on the answer; the API key
    checked (401 none, 403 wrong) and the rate limit (429 with Retry-After) on every route but the open ones;
    one JSON line on the `rmbg_demo.access` logger when it ends (id, method, route, status, model, size,
    seconds, bytes in and out; never image data or keys). A failure inside answers 500 JSON, not a dropped
    connection: the service stays up."""

    def __init__(self, app, keys: ApiKeys, limiter: RateLimiter | None = None):
        self.app, self.keys, self.limiter = app, keys, limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if SANE_REQUEST_ID.match(given) else uuid.uuid4().hex
        record = {"id": request_id, "method": scope["method"], "route": scope["path"], "status": None,
                  "model": None, "size": None, "seconds": None, "bytes_in": 0, "bytes_out": 0}
        scope.setdefault("state", {})["access"] = record  # handlers add the model and size (request.state)
        extra = [(b"x-request-id", request_id.encode())]

        async def counted_receive():
            message = await receive()
            record["bytes_in"] += len(message.get("body", b""))
            return message

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                record["bytes_out"] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self._refusal(scope["path"], headers, scope.get("client"), extra)
            if refusal:
                await _send_json(tagged_send, *refusal)
            else:
                await self.app(scope, counted_receive, tagged_send)
        except Exception as exc:  # noqa: BLE001 - a bug answers JSON like every other error; the server lives on
            log.exception("%s %s failed (request %s)", scope["method"], scope["path"], request_id)
            if record["status"] is None:
                await _send_json(tagged_send, 500, error_body(scope["path"], f"internal error: "
                                                              f"{exc.__class__.__name__}: {exc}", "unknown_error"))
        finally:
            record["seconds"] = round(time.perf_counter() - started, 4)
            ACCESS_LOG.info(json.dumps(record, separators=(",", ":")))

    def _refusal(self, path: str, headers: dict, client, extra: list) -> tuple[int, dict] | None:
        """(status, body) when the request may not go on: no key, a wrong one, over the rate limit."""
        if path in OPEN_PATHS:
            return None
        caller = client[0] if client else "unknown"
        if self.keys:
            key = presented_key(headers)
            index = self.keys.match(key)
            if index is None:
                # remove.bg answers 403 for both (its clients expect that); our routes 401 asks for a key
                status = 403 if key or path.startswith("/v1.0/") else 401
                message = "wrong API key" if key else \
                    "an API key is needed: X-Api-Key: KEY or Authorization: Bearer KEY"
                if status == 401:
                    extra.append((b"www-authenticate", b'Bearer realm="rmbg"'))
                return status, error_body(path, message, "auth_failed")
            caller = f"key#{index}"
        if self.limiter:
            wait = self.limiter.admit(caller)
            if wait is not None:
                extra.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
                return 429, error_body(path, f"rate limit exceeded: {self.limiter.per_minute} requests a minute; "
                                             f"retry in {max(1, math.ceil(wait))} s", "rate_limit_exceeded")
        return None


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
