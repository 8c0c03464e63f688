"""`rmbg serve --ray`: the same app deployed on a real local Ray Serve (u2netp, 127.0.0.1). It must answer the
same bytes as the plain server, keep its keys, give concurrent requests sharing `@serve.batch` batches their
own masks, and answer 503 when Ray's queue is full."""
import pytest
import requests
from helpers import ASSETS, free_port
from test_serve import clients_get_their_own_images, full_queue_statuses

from rmbg_demo.cluster.serve import replica_options, start_service
from rmbg_demo.service import ServeSettings
from rmbg_demo.service.plain import ServiceThread

KEY = "ray-key-0123456789"
SETTINGS = ServeSettings(model="u2netp", max_batch=4, max_queued=4, api_keys=(KEY,), allow_private_urls=True)
PHOTO = (ASSETS / "coffee.jpg").read_bytes()
BACKDROP = (ASSETS / "brick.jpg").read_bytes()


@pytest.fixture(scope="module")
def on_ray(local_ray):
    from ray import serve

    yield start_service(SETTINGS, port=free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def plain():
    running = ServiceThread(SETTINGS)
    yield running.url
    running.stop()


SAME_REQUESTS = {  # name -> (route and query, requests' keywords)
    "remove": ("/remove", {"data": PHOTO}),
    "remove_framed_webp": ("/remove?format=webp&crop=1&margin=5%25&shadow=drop&background=%23336699", {"data": PHOTO}),
    "remove_mask": ("/remove?mask=1", {"data": PHOTO}),
    "remove_background_image": ("/remove", {"files": {"image": PHOTO, "background_image": BACKDROP}}),
    "removebg_zip": ("/v1.0/removebg", {"files": {"image_file": PHOTO}, "data": {"format": "zip", "size": "full"}}),
    "removebg_crop_alpha": ("/v1.0/removebg", {"files": {"image_file": PHOTO},
                                               "data": {"crop": "true", "channels": "alpha"}}),
    "removebg_json": ("/v1.0/removebg", {"json": {"image_file_b64": __import__("base64").b64encode(PHOTO).decode(),
                                                  "scale": "60%", "position": "center", "bg_color": "81d4fa"}}),
    "bad_setting": ("/remove?size=1000", {"data": PHOTO}),
}
COMPARED_HEADERS = ("Content-Type", "X-Model", "X-Confidence", "X-Image-Size", "X-Width", "X-Height",
                    "X-Foreground-Left", "X-Foreground-Top", "X-Foreground-Width", "X-Foreground-Height")


@pytest.mark.parametrize("name", SAME_REQUESTS)
def test_plain_and_ray_answer_the_same_bytes(on_ray, plain, name):
    route, keywords = SAME_REQUESTS[name]
    answers = [requests.post(base + route, headers={"X-Api-Key": KEY}, timeout=120, **keywords)
               for base in (plain, on_ray)]
    assert answers[0].status_code == answers[1].status_code
    assert answers[0].content == answers[1].content
    assert [answers[0].headers.get(h) for h in COMPARED_HEADERS] == [answers[1].headers.get(h)
                                                                      for h in COMPARED_HEADERS]


def test_ray_keeps_the_keys_and_the_docs(on_ray):
    assert requests.get(f"{on_ray}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{on_ray}/models", timeout=30).status_code == 401
    assert requests.get(f"{on_ray}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    answer = requests.get(f"{on_ray}/openapi.json", timeout=30)
    assert "/v1.0/removebg" in answer.json()["paths"] and answer.headers["X-Request-Id"]


def test_concurrent_clients_get_their_own_images_through_serve_batch(on_ray):
    """Ray Serve's router counts a burst's requests as queued until it has probed the replica, so 8 at once can
    meet this deployment's small queue (4, for the test below) with a 503 though the replica has room for 8: the
    clients back off and ask again, as a client told "queue full" does."""
    assert clients_get_their_own_images(on_ray, headers={"X-Api-Key": KEY}, retries_on_503=5) == []


def test_a_full_ray_queue_answers_503_and_the_rest_are_served(on_ray):
    assert full_queue_statuses(on_ray, headers={"X-Api-Key": KEY}) == "ok"


def test_replica_options():
    assert replica_options("2", 0, 8, 64)["num_replicas"] == 2
    auto = replica_options("auto", 4, 8, 64)
    assert auto["autoscaling_config"]["max_replicas"] == 4 and auto["ray_actor_options"]["num_gpus"] == 1
    assert replica_options("1", 0, 8, 64)["ray_actor_options"]["num_gpus"] == 0
    with pytest.raises(ValueError, match="--replicas"):
        replica_options("many", 0, 8, 64)
