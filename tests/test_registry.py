"""The registry is the one place that knows a model: every entry builds, validates and shows up
wherever models are listed; adding a model is one `register(...)` call."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from helpers import ASSETS, ROOT, AppServer, fixture_model, hermetic_env, parity, rmbg_in_process
from PIL import Image
from safetensors.torch import save_file

from rmbg_demo.models import (
    DEFAULT,
    FALLBACK,
    REGISTRY,
    Activation,
    MaskResize,
    ModelSpec,
    Runtime,
    get_spec,
    model_names,
    register,
    unregister,
)
from rmbg_demo.weights import weights_available


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_builds_and_has_a_valid_spec(name):
    spec = get_spec(name)
    assert isinstance(spec.runtime, Runtime) and isinstance(spec.activation, Activation)
    assert isinstance(spec.mask_resize, MaskResize)
    assert all(size % 32 == 0 for size in spec.input_size)
    assert spec.licence and spec.licence_url.startswith("https://")
    if spec.runtime is Runtime.TORCH:
        with torch.device("meta"):
            network = spec.build()
        assert sum(p.numel() for p in network.parameters()) > 1_000_000
        assert not network.training
        assert spec.hub_repo and spec.download_mb  # listed with its size before anyone downloads it
    else:
        assert spec.embedded and spec.onnx_file().is_file() and weights_available(name)
    for alias in spec.aliases:
        assert get_spec(alias) is spec


@pytest.fixture(scope="module")
def cli_texts() -> dict[str, str]:
    """What a user reads: `rmbg remove/eval/compare --help` and `rmbg models`, each run once, in this
    process (the installed console script runs as a subprocess in test_cli.py)."""
    texts = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "400")  # argparse wraps help at the terminal's width
        for command in (["remove", "--help"], ["eval", "--help"], ["compare", "--help"], ["models"]):
            run = rmbg_in_process(*command)
            assert run.returncode == 0, (command, run.stderr)
            texts[command[0]] = run.stdout
    return texts


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_is_offered_by_the_cli(cli_texts, name):
    for command in ("remove", "eval", "compare"):
        assert name in cli_texts[command], command
    assert any(line.startswith(f"{name} ") for line in cli_texts["models"].splitlines())


def test_default_and_fallback_are_named_once():
    assert get_spec(DEFAULT).gated and not get_spec(DEFAULT).embedded
    assert get_spec(FALLBACK).embedded


@pytest.mark.parametrize("field, value, message", [
    ("activation", "sigmod", "activation='sigmod' is not one of: sigmoid, minmax"),
    ("mask_resize", "cubic", "mask_resize='cubic' is not one of: bicubic, bilinear"),
    ("runtime", "tensorrt", "runtime='tensorrt' is not one of: torch, onnx"),
    ("input_size", (1000, 1024), "must be two multiples of 32"),
    ("builder", None, "a torch model needs a builder"),
])
def test_a_typo_in_a_spec_fails_when_it_is_registered(field, value, message):
    fields = dict(name="typo", title="t", licence="MIT", licence_url="https://example.org", input_size=(256, 256),
                  builder=lambda: torch.nn.Identity())
    fields[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelSpec(**fields)


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):
        register(ModelSpec(name="rmbg2", title="t", licence="MIT", licence_url="https://example.org",
                           input_size=(256, 256), builder=lambda: torch.nn.Identity()))
    assert get_spec("rmbg2").name == "rmbg-2.0"


# A plug-in as a user would write it: one register(...) per model, nothing else.
PLUGIN = textwrap.dedent('''
    from rmbg_demo.models import ModelSpec, Runtime, register
    from rmbg_demo.models.birefnet import BIREFNET_LITE_CONFIG, BiRefNet, checkpoint_filter
    from rmbg_demo.models.u2netp import bundled_onnx_path

    register(ModelSpec(name="my-onnx", title="My ONNX model", licence="MIT", licence_url="https://example.org",
                       input_size=(320, 320), runtime=Runtime.ONNX, onnx_file=bundled_onnx_path,
                       output_index=0, activation="minmax"))
    register(ModelSpec(name="my-lite", title="My BiRefNet lite", licence="MIT", licence_url="https://example.org",
                       input_size=(256, 256), builder=lambda: BiRefNet(BIREFNET_LITE_CONFIG),
                       checkpoint_filter=checkpoint_filter, env_weights="MY_LITE_WEIGHTS"))
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "my_models.py").write_text(PLUGIN)
    weights = folder / "my-lite.safetensors"
    save_file(parity.deterministic_state_dict(fixture_model("birefnet-lite")), str(weights))
    return folder, {"PYTHONPATH": f"{folder}:{ROOT}", "MY_LITE_WEIGHTS": str(weights)}


def run_with_plugin(plugin, code: str):
    folder, env = plugin
    return subprocess.run([sys.executable, "-c", f"import my_models\n{code}"], capture_output=True, text=True,
                          env=hermetic_env(**env), timeout=300)


def test_models_registered_by_a_plugin_list_and_run_in_the_cli(plugin, tmp_path):
    # One interpreter for the three commands (each start imports torch: 4-5 s here).
    commands = [["models"]] + [["remove", str(ASSETS / "chelsea.jpg"), "-o", str(tmp_path / name), "--model", name,
                                "--mask", "-q"] for name in ("my-onnx", "my-lite")]
    run = run_with_plugin(plugin, "import sys; from rmbg_demo.cli import main\n"
                                  f"for command in {commands!r}:\n"
                                  "    print('exit', main(command), file=sys.stderr, flush=True)")
    assert run.stderr.count("exit 0") == 3, run.stderr
    assert "my-onnx " in run.stdout and "my-lite " in run.stdout, run.stdout
    for name in ("my-onnx", "my-lite"):
        assert f"[{name}]" in run.stderr
        mask = np.asarray(Image.open(tmp_path / name / "chelsea_mask.png"))
        assert mask.shape == (300, 451) and mask.std() > 4


def test_models_registered_by_a_plugin_list_and_run_in_the_app(plugin):
    folder, env = plugin
    launcher = folder / "app_with_plugin.py"
    launcher.write_text(f"import runpy, sys\nimport my_models\nsys.argv[0] = {str(ROOT / 'app.py')!r}\n"
                        f"runpy.run_path({str(ROOT / 'app.py')!r}, run_name='__main__')\n")
    server = AppServer(env=env, script=launcher).wait()
    try:
        client = Client(server.url, verbose=False)
        api = str(client.view_api(return_format="dict", print_info=False))
        assert "'my-lite'" in api and "'my-onnx'" in api  # the model parameter's choices
        for name in ("my-onnx", "my-lite"):
            result = client.predict(handle_file(str(ASSETS / "chelsea.jpg")), name, "transparent", "#ffffff", None,
                                    False, "png", api_name="/image")
            assert f"[{name}]" in result[4]
            assert Image.open(result[1]).size == (451, 300)
    finally:
        server.stop()


def test_unregister_removes_a_model_and_its_aliases():
    register(ModelSpec(name="temporary", title="t", licence="MIT", licence_url="https://example.org",
                       input_size=(256, 256), builder=lambda: torch.nn.Identity(), aliases=("temp",)))
    unregister("temp")
    assert "temporary" not in REGISTRY and "temp" not in REGISTRY
