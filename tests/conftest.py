import os

import pytest
import torch
from helpers import LEAKY_VARIABLES, AppServer, ImageServer, compiled_lite_app, fixture_model, hermetic_env


@pytest.fixture(scope="session", autouse=True)
def hermetic_process():
    """In-process tests, too, see none of the developer's weights, tokens or hub settings: an
    empty Hugging Face cache and home of their own, and a closed hub address."""
    environment = hermetic_env()
    with pytest.MonkeyPatch.context() as patch:
        for name in LEAKY_VARIABLES:
            patch.delenv(name, raising=False)
        for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY", "RMBG_OPENVINO_CACHE"):
            patch.setenv(name, environment[name])
        yield


@pytest.fixture(scope="session")
def rmbg2_fixture_model() -> torch.nn.Module:
    """RMBG-2.0's network with the parity fixture's deterministic weights (no download)."""
    return fixture_model("rmbg-2.0")


@pytest.fixture(scope="session")
def lite_fixture_model() -> torch.nn.Module:
    return fixture_model("birefnet-lite")


@pytest.fixture(scope="session")
def lite_weights_file(lite_fixture_model, tmp_path_factory):
    """BiRefNet lite's fixture weights as a real checkpoint file, as `--weights FILE` takes it."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "birefnet-lite.safetensors"
    save_file({k: v.clone() for k, v in lite_fixture_model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session", autouse=True)
def early_servers(request, hermetic_process):
    """Apps whose start-up is long single-threaded work (the compiled app: dynamo's capture, about 40 s)
    start with the session when a selected test needs them, on the core the first tests leave idle;
    the tests' fixtures wait for them then."""
    early = {}
    if any("compiled_app" in item.fixturenames for item in request.session.items):
        folder = request.getfixturevalue("tmp_path_factory").mktemp("compiled-app")
        early["compiled_app"] = compiled_lite_app(folder, request.getfixturevalue("lite_weights_file"))
    yield early
    for server in early.values():
        server.stop()


@pytest.fixture(scope="session")
def compiled_app(early_servers) -> AppServer:
    """The compiled app (helpers.compiled_lite_app), started; `.wait()` for it."""
    return early_servers["compiled_app"]


@pytest.fixture(scope="session")
def app_server():
    server = AppServer("--allow-private-urls").wait()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_server():
    server = ImageServer()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def restore_torch_settings():
    """Tests may change process-wide torch settings; each gets them back as they were."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark = saved[1]
    torch.set_num_threads(saved[2])


def pytest_collection_modifyitems(session, config, items):
    """The tests on a local Ray (test_cluster.py's, then test_serve.py's) run one after another, so that one
    Ray serves them all; it is shut down after the last of them (pytest_runtest_teardown)."""
    on_ray = [item for item in items if "local_ray" in item.fixturenames]
    if on_ray:
        first = items.index(on_ray[0])
        others = [item for item in items if "local_ray" not in item.fixturenames]
        items[:] = others[:first] + on_ray + others[first:]
    config.last_ray_test = on_ray[-1] if on_ray else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test on Ray and its fixtures' teardown (Serve's included): an idle Ray's processes
    (raylet, GCS, Serve's controller and proxy) would share the two cores with every later test."""
    try:
        return (yield)
    finally:
        if item is item.config.last_ray_test:
            import ray

            ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 in server mode; its endpoint and fake credentials in the environment before Ray starts, so
    pyarrow finds them in the driver and in every worker, as it would find a real store's."""
    from helpers import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"http://127.0.0.1:{port}"
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    server.stop()


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """One local Ray (2 CPUs) for the cluster and serve tests, started after the S3 environment is set so
    that its workers inherit it; pytest_runtest_teardown shuts it down after the last of those tests."""
    import ray

    from rmbg_demo.cluster.runtime import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(None, num_cpus=2, quiet=True)
