"""The service as an API (the plain server, u2netp, real HTTP on 127.0.0.1): keys, the rate limit, request IDs,
the JSON access log, the OpenAPI document, and hostile requests that must leave it up, with flat memory."""
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import requests
from helpers import ASSETS, ROOT, bomb_png, free_port, hermetic_env, rmbg_in_process

from rmbg_demo.request import QUERY_FIELDS
from rmbg_demo.service import ServeSettings
from rmbg_demo.service.access import load_api_keys, parse_rate_limit
from rmbg_demo.service.plain import ServiceThread
from rmbg_demo.service.removebg import FIELDS

KEYS = ("first-key-0123456789", "second-key-9876543210")
PHOTO = (ASSETS / "coffee.jpg").read_bytes()


@pytest.fixture(scope="module")
def keyed():
    running = ServiceThread(ServeSettings(model="u2netp", api_keys=KEYS, max_bytes=4 * 2**20))
    yield running
    running.stop()


def get(server, path, **headers):
    return requests.get(f"{server.url}{path}", headers=headers, timeout=30)


def test_keys_guard_every_route_but_the_health_check_and_the_docs(keyed):
    assert get(keyed, "/healthz").status_code == 200
    assert get(keyed, "/openapi.json").status_code == 200 and "swagger" in get(keyed, "/docs").text.lower()
    missing = get(keyed, "/models")
    assert missing.status_code == 401 and "API key is needed" in missing.json()["error"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = get(keyed, "/models", **{"X-Api-Key": "not-a-key-at-all"})
    assert wrong.status_code == 403 and wrong.json() == {"error": "wrong API key"}
    assert get(keyed, "/models", **{"X-Api-Key": KEYS[0]}).status_code == 200
    assert get(keyed, "/models", Authorization=f"Bearer {KEYS[1]}").status_code == 200
    assert get(keyed, "/models", Authorization=f"Basic {KEYS[1]}").status_code == 401  # only Bearer carries one
    refused = requests.post(f"{keyed.url}/remove", data=PHOTO, timeout=30)
    assert refused.status_code == 401  # refused before the body is read or decoded
    served = requests.post(f"{keyed.url}/remove", data=PHOTO, headers={"X-Api-Key": KEYS[0]}, timeout=60)
    assert served.status_code == 200 and served.headers["Content-Type"] == "image/png"


def test_keys_never_reach_the_logs(keyed, caplog):
    with caplog.at_level(logging.DEBUG):
        get(keyed, "/models", **{"X-Api-Key": KEYS[0]})
        get(keyed, "/models", **{"X-Api-Key": "a-wrong-key-here"})
    assert caplog.records and not any(k in caplog.text for k in (*KEYS, "a-wrong-key-here"))
    assert KEYS[0] not in repr(keyed.service.settings)


def test_the_access_log_is_one_json_line_per_request_with_its_id(keyed, caplog):
    with caplog.at_level(logging.INFO, logger="rmbg_demo.access"):
        mine = requests.post(f"{keyed.url}/remove?format=webp", data=PHOTO, timeout=60,
                             headers={"X-Api-Key": KEYS[0], "X-Request-Id": "order-42.a"})
        odd = get(keyed, "/models", **{"X-Api-Key": KEYS[0], "X-Request-Id": "no spaces <allowed> here"})
    assert mine.headers["X-Request-Id"] == "order-42.a"
    assert len(odd.headers["X-Request-Id"]) == 32 and odd.headers["X-Request-Id"] != "no spaces <allowed> here"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "rmbg_demo.access"]
    line = next(entry for entry in lines if entry["id"] == "order-42.a")
    assert line["route"] == "/remove" and line["status"] == 200 and line["model"] == "u2netp"
    assert line["size"] == "600x400" and line["bytes_in"] == len(PHOTO) and line["bytes_out"] == len(mine.content)
    assert line["seconds"] > 0 and line["method"] == "POST"
    assert any(entry["id"] == odd.headers["X-Request-Id"] and entry["status"] == 200 for entry in lines)


def test_rate_limit_answers_429_with_retry_after_per_key():
    running = ServiceThread(ServeSettings(model="u2netp", api_keys=KEYS, rate_limit=3))
    try:
        statuses = [get(running, "/models", **{"X-Api-Key": KEYS[0]}).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        over = get(running, "/models", **{"X-Api-Key": KEYS[0]})
        assert over.status_code == 429 and 1 <= int(over.headers["Retry-After"]) <= 60
        assert "3 requests a minute" in over.json()["error"]
        assert get(running, "/models", **{"X-Api-Key": KEYS[1]}).status_code == 200  # each key its own count
        assert get(running, "/healthz").status_code == 200  # never limited
    finally:
        running.stop()


def test_key_sources_and_settings(tmp_path, monkeypatch):
    listed = tmp_path / "keys.txt"
    listed.write_text("# team keys\nfile-key-000000001\n\n  file-key-000000002  \n")
    env = {"RMBG_API_KEYS": "env-key-000000001, env-key-000000002"}
    assert load_api_keys(["flag-key-00000001"], listed, env) == (
        "flag-key-00000001", "file-key-000000001", "file-key-000000002", "env-key-000000001", "env-key-000000002")
    with pytest.raises(ValueError, match="at least 8 characters"):
        load_api_keys(["short"], None, {})
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys([], tmp_path / "missing.txt", {})
    assert parse_rate_limit("60/min") == 60 and parse_rate_limit("2/s") == 120 and parse_rate_limit(None) is None
    with pytest.raises(ValueError, match="N/min"):
        parse_rate_limit("lots")
    refused = rmbg_in_process("serve", "--api-keys", tmp_path / "missing.txt")
    assert refused.returncode == 2 and "cannot read" in refused.stderr
    refused = rmbg_in_process("serve", "--rate-limit", "fast")
    assert refused.returncode == 2 and "--rate-limit 'fast'" in refused.stderr
    refused = rmbg_in_process("serve", "--replicas", "2")
    assert refused.returncode == 2 and "--replicas needs --ray" in refused.stderr


def test_a_public_address_without_keys_warns_loudly():
    """`rmbg serve --host 0.0.0.0` as a user starts it: a warning that says how to add a key, then it serves."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "rmbg_demo", "serve", "--host", "0.0.0.0", "--port", str(port),
                                "--model", "u2netp"], cwd=ROOT, env=hermetic_env(), stderr=subprocess.PIPE, text=True)
    try:
        said = []
        for line in process.stderr:
            said.append(line)
            if line.startswith("serving"):
                break
        text = "".join(said)
        assert "WARNING" in text and "no API key" in text and "--api-key KEY" in text
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
    finally:
        process.terminate()
        process.wait(30)


def test_openapi_validates_and_lists_every_route_and_parameter(keyed):
    from openapi_spec_validator import validate

    spec = get(keyed, "/openapi.json").json()
    validate(spec)
    assert {"/remove", "/predict", "/models", "/healthz", "/v1.0/removebg", "/v1.0/account"} <= set(spec["paths"])
    remove = spec["paths"]["/remove"]["post"]
    assert {p["name"] for p in remove["parameters"]} == set(QUERY_FIELDS)
    assert set(remove["requestBody"]["content"]) >= {"application/octet-stream", "multipart/form-data",
                                                     "application/json"}
    removebg = spec["paths"]["/v1.0/removebg"]["post"]["requestBody"]["content"]
    assert set(removebg["multipart/form-data"]["schema"]["properties"]) == set(FIELDS)
    assert spec["components"]["securitySchemes"]["ApiKey"]["name"] == "X-Api-Key"
    assert remove["security"] and "security" not in spec["paths"]["/healthz"]["get"]


def raw_request(url: str, head: bytes, body: bytes = b"") -> int:
    """Sends bytes as they are (a body shorter than declared, a header promising 60 MB) and returns the status."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_hostile_requests_get_the_right_status_and_memory_stays_flat(keyed, image_server):
    key = {"X-Api-Key": KEYS[0]}
    head = f"POST /v1.0/removebg HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEYS[0]}\r\n".encode()
    bomb = bomb_png(100_000, 100_000)
    hostile = [
        # the client sends part of what it declared, then hangs up: nobody is left to answer (0), and nothing breaks
        ("truncated body", lambda: raw_request(keyed.url, head + b"Content-Type: application/json\r\n"
                                               b"Content-Length: 5000\r\n\r\n", b'{"image_file_b64": "abc'), 0),
        ("truncated image", lambda: requests.post(f"{keyed.url}/v1.0/removebg", files={"image_file": PHOTO[:9000]},
                                                  headers=key, timeout=30).status_code, 400),
        ("60 MB body", lambda: raw_request(keyed.url, head + b"Content-Type: application/json\r\n"
                                           b"Content-Length: 60000000\r\n\r\n"), 413),
        ("decompression bomb", lambda: requests.post(f"{keyed.url}/v1.0/removebg", files={"image_file": bomb},
                                                     headers=key, timeout=30).status_code, 400),
        ("malformed multipart", lambda: requests.post(f"{keyed.url}/remove", data=b"--b\r\nx", timeout=30, headers={
            **key, "Content-Type": "multipart/form-data; boundary=b"}).status_code, 400),
        ("bad base64", lambda: requests.post(f"{keyed.url}/v1.0/removebg", json={"image_file_b64": "@@@"},
                                             headers=key, timeout=30).status_code, 400),
        ("private image_url", lambda: requests.post(f"{keyed.url}/v1.0/removebg", headers=key, timeout=30, json={
            "image_url": image_server.url + "coffee.jpg"}).status_code, 400),
        ("unknown field", lambda: requests.post(f"{keyed.url}/v1.0/removebg", headers=key, timeout=30, json={
            "image_url": "https://example.com/a.jpg", "colour": "red"}).status_code, 400),
    ]
    for name, send, status in hostile:
        assert send() == status, name
    for _ in range(30):  # warm up: allocator pools, connection objects, logging
        for _, send, _ in hostile:
            send()
    before = rss_mb()
    for index in range(1000):
        name, send, status = hostile[index % len(hostile)]
        assert send() == status, name
    grown = rss_mb() - before
    assert grown < 30, f"memory grew by {grown:.0f} MB over 1,000 hostile requests"
    good = requests.post(f"{keyed.url}/remove", data=PHOTO, headers=key, timeout=60)
    assert good.status_code == 200


def test_a_removal_holds_no_picture_once_its_answer_is_made():
    """The memory budget trims the heap when a request releases it; the decoded photo (and the result around
    it) must be gone by then, or a large request's memory stays with the process (it did: the answer object
    kept the result)."""
    import asyncio
    import gc
    import weakref

    from rmbg_demo.service.core import Service

    service = Service(ServeSettings(model="u2netp"))
    seen = []

    def prepare(image):
        seen.append(weakref.ref(image))
        return image

    removal = asyncio.run(service.remove(PHOTO, "u2netp", None, lambda result: b"answer", prepare=prepare))
    gc.collect()
    assert removal.answer == b"answer" and removal.image_size == (600, 400)
    assert seen and seen[0]() is None
