"""The OpenVINO runtime: every registered model on it matches float32, its caches make a second start cheap,
`auto` keeps within its budget, and a machine without openvino runs everything else. The session shares one
OpenVINO cache (conftest), so each network is converted once."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import fixture_model, hermetic_env
from PIL import Image

from rmbg_demo.engines import auto_runtime, build_engine, runtime_for
from rmbg_demo.evaluation import BUILTIN_BENCHMARK
from rmbg_demo.models import Runtime, get_spec, model_names
from rmbg_demo.processing import preprocess

openvino = pytest.importorskip("openvino")

SIZE = {"u2netp": (320, 320)}  # fixed by its graph; the PyTorch networks at a small size
PHOTOS = sorted((BUILTIN_BENCHMARK / "images").glob("*.jpg"))[:2]


@pytest.fixture(scope="session")
def fixture_networks():
    """Fixture-weight networks by model; rmbg-2.0 and birefnet-general are one network with the same
    tensors, so they share one conversion."""
    return {}


def network_for(name, networks):
    if name not in networks:
        networks[name] = fixture_model(name)
    return networks[name]


def inputs(name, size):
    spec = get_spec(name)
    return torch.cat([preprocess(Image.open(path).convert("RGB"), spec, size) for path in PHOTOS])


def reference_engine(name, networks):
    """Float32 as the project runs it without OpenVINO: PyTorch, or ONNX Runtime for an ONNX graph."""
    if get_spec(name).runtime is Runtime.ONNX:
        return build_engine(name, runtime="onnxruntime")
    return build_engine(name, device="cpu", dtype="float32", network=network_for(name, networks))


def openvino_engine(name, networks, dtype="float32"):
    network = None if get_spec(name).runtime is Runtime.ONNX else network_for(name, networks)
    return build_engine(name, network=network, dtype=dtype, runtime="openvino", input_size=SIZE.get(name, (256, 256)))


def mask_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest difference of the 8-bit masks, in 1/255 steps."""
    return int(((a * 255).round() - (b * 255).round()).abs().max())


@pytest.mark.parametrize("name", model_names())
def test_every_model_on_openvino_f32_matches_float32(name, fixture_networks):
    size = SIZE.get(name, (256, 256))
    batch = inputs(name, size)
    engine = openvino_engine(name, fixture_networks)
    assert engine.name == "openvino" and engine.precision == "f32" and "f32, exact" in engine.describe()
    got, expected = engine(batch), reference_engine(name, fixture_networks)(batch)
    assert got.shape == expected.shape == (len(PHOTOS), 1, *size)
    assert mask_difference(got, expected) <= 1  # float32 sums in another order: a rounding step at most
    if get_spec(name).for_conversion:  # BiRefNet at f32: the sampled form, which OpenVINO runs faster
        assert "GridSample" in layer_types(engine, size) and "DeformableConvolution" not in layer_types(engine, size)


def test_an_exported_file_runs_on_openvino_as_its_metadata_says(tmp_path, fixture_networks):
    """`rmbg export`'s file: OpenVINO reads the model, size and activation from its metadata, as ONNX Runtime does,
    and its masks agree; the file's fixed size is refused elsewhere with the same words."""
    pytest.importorskip("onnx")
    from rmbg_demo.export import export_onnx

    path = export_onnx("birefnet-lite", tmp_path / "lite.onnx", network=network_for("birefnet-lite", fixture_networks),
                       size=256, check=False).path
    engine = build_engine("birefnet-lite", path, runtime="openvino")
    onnx_runtime = build_engine("birefnet-lite", path, runtime="onnxruntime")
    assert (engine.model_name, engine.input_size, engine.activation) == ("birefnet-lite", (256, 256), "sigmoid")
    assert "birefnet-lite (lite.onnx) on cpu, openvino" in engine.describe()
    batch = inputs("birefnet-lite", (256, 256))
    assert mask_difference(engine(batch), onnx_runtime(batch)) <= 1
    with pytest.raises(ValueError, match="export it again at that size"):
        build_engine("birefnet-lite", path, runtime="openvino", input_size=(320, 320))


def cache_files(folder):
    return {path.relative_to(folder) for path in folder.rglob("*") if path.is_file()}


def test_a_second_start_uses_the_caches_and_not_the_weights(tmp_path, monkeypatch, fixture_networks):
    """RMBG-1.4 (the quickest PyTorch network to convert) from a weights file, as a user starts it."""
    from safetensors.torch import save_file

    weights = tmp_path / "rmbg-1.4.safetensors"
    save_file({k: v.contiguous() for k, v in network_for("rmbg-1.4", fixture_networks).state_dict().items()},
              str(weights))
    cache = tmp_path / "cache"
    monkeypatch.setenv("RMBG_OPENVINO_CACHE", str(cache))
    batch = inputs("rmbg-1.4", (256, 256))
    first = build_engine("rmbg-1.4", weights, runtime="openvino", input_size=(256, 256))
    made = cache_files(cache)
    assert any(p.suffix == ".xml" for p in made) and any(p.parts[0] == "compiled" for p in made)

    def no_loading(*args, **kwargs):
        raise AssertionError("the second start loaded the PyTorch weights")

    monkeypatch.setattr("rmbg_demo.weights.load_model", no_loading)
    second = build_engine("rmbg-1.4", weights, runtime="openvino", input_size=(256, 256))
    assert cache_files(cache) == made  # nothing converted or compiled again
    assert torch.equal(first(batch), second(batch))


native_bf16 = pytest.mark.skipif(not openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES").count("BF16"),
                                 reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")


def layer_types(engine, size) -> set[str]:
    return {op.get_rt_info()["layerType"].astype(str) for op in engine.compiled[size].get_runtime_model().get_ops()}


@native_bf16
def test_bf16_keeps_birefnet_within_autos_budget_with_native_deformable_convolutions(fixture_networks):
    """Converted from PyTorch, BiRefNet's deformable convolutions are OpenVINO's own op (in f32), not the sampled
    form whose bf16 sampling positions moved RMBG-2.0's masks by 7/255; at 512 (the fixture weights' masks at
    256 are not a photo's) the bf16 masks stay within what auto may cost."""
    from rmbg_demo.engines.ov import AUTO_BUDGET

    size = (512, 512)
    engine = build_engine("birefnet-lite", network=network_for("birefnet-lite", fixture_networks), dtype="bfloat16",
                          runtime="openvino", input_size=size)
    assert "DeformableConvolution" in layer_types(engine, size) and "GridSample" not in layer_types(engine, size)
    batch = inputs("birefnet-lite", size)
    reference = build_engine("birefnet-lite", device="cpu", dtype="float32",
                             network=network_for("birefnet-lite", fixture_networks))
    assert mask_difference(engine(batch), reference(batch)) <= AUTO_BUDGET


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("bf16", [True, False])
def test_auto_picks_openvino_only_where_measured_within_its_budget(name, bf16, monkeypatch):
    """auto runs OpenVINO only for a PyTorch network whose bf16 masks were measured within 2/255, on a CPU with
    native bf16; everything else keeps the model's own runtime, whatever precision is asked."""
    from rmbg_demo.engines import ov

    monkeypatch.setattr(ov, "cpu_runs_bf16", lambda: bf16)
    spec = get_spec(name)
    own = "onnxruntime" if spec.runtime is Runtime.ONNX else "torch"
    measured = ov.MEASURED_ERRORS.get((name, "bf16", "pytorch"))
    within = spec.runtime is Runtime.TORCH and measured is not None and measured <= ov.AUTO_BUDGET
    for dtype in ("auto", "bfloat16"):
        assert auto_runtime(spec, None, "cpu", dtype) == ("openvino" if bf16 and within else own)
    assert ov.auto_precision(spec) == ("bf16" if bf16 and within else "f32")
    for dtype in ("float32", "int8"):
        assert auto_runtime(spec, None, "cpu", dtype) == own
    assert auto_runtime(spec, "model.onnx", "cpu", "auto") == "onnxruntime"
    assert auto_runtime(spec, None, "cuda", "auto") == own
    # measured at the model's own size only: elsewhere auto keeps the model's own runtime and f32
    assert auto_runtime(spec, None, "cpu", "auto", (256, 256)) == own and ov.auto_precision(spec, (256, 256)) == "f32"
    assert ov.MEASURED_ERRORS.get((name, ov.auto_precision(spec), "pytorch"), 0) <= ov.AUTO_BUDGET


def test_the_engine_auto_builds_runs_bf16_only_at_the_measured_size(monkeypatch, fixture_networks):
    """`--runtime openvino` at --dtype auto: bf16 at the model's own size, where it was measured, and f32 (exact,
    the sampled form) at any other size a request asks; the model line says both."""
    from rmbg_demo.engines import ov

    monkeypatch.setattr(ov, "cpu_runs_bf16", lambda: True)
    engine = build_engine("birefnet-lite", network=network_for("birefnet-lite", fixture_networks), runtime="openvino",
                          input_size=(256, 256))
    assert engine.precision == "auto" and engine.precision_at((256, 256)) == "f32"
    assert engine.precision_at((1024, 1024)) == "bf16"
    assert "bf16, masks up to 2/255 from float32, measured, at 1024x1024; f32, exact, at other sizes" in \
        engine.describe()
    assert "GridSample" in layer_types(engine, (256, 256))  # compiled at 256: f32's sampled form
    monkeypatch.setattr(ov, "cpu_runs_bf16", lambda: False)
    assert engine.precision_at((1024, 1024)) == "f32" and "(f32, exact)" in engine.describe()


def test_auto_relies_on_a_measured_figure_for_rmbg2():
    """What auto relies on for RMBG-2.0 (bench/RESULTS.md): within budget as converted, not as an ONNX file."""
    from rmbg_demo.engines import ov

    assert ov.MEASURED_ERRORS[("rmbg-2.0", "bf16", "pytorch")] <= ov.AUTO_BUDGET < ov.MEASURED_ERRORS[
        ("rmbg-2.0", "bf16", "onnx")]


def test_runtimes_that_cannot_run_a_model_say_what_can():
    with pytest.raises(ValueError, match="u2netp .an ONNX graph. has none: use --runtime onnxruntime or openvino"):
        runtime_for(get_spec("u2netp"), runtime="torch")
    with pytest.raises(ValueError, match="rmbg export --model birefnet-lite"):
        runtime_for(get_spec("birefnet-lite"), runtime="onnxruntime")
    with pytest.raises(ValueError, match="runs on the CPU, not cuda"):
        build_engine("u2netp", device="cuda", runtime="openvino")
    with pytest.raises(ValueError, match="float16 does not run on OpenVINO"):
        build_engine("u2netp", dtype="float16", runtime="openvino")
    with pytest.raises(ValueError, match="int8 ruins u2netp's masks .* use --dtype float32"):
        build_engine("u2netp", dtype="int8", runtime="openvino")


def test_a_file_that_is_not_onnx_is_named_for_what_it_is(tmp_path):
    photo = tmp_path / "model.onnx"
    photo.write_bytes((BUILTIN_BENCHMARK / "images" / "0000.jpg").read_bytes())
    with pytest.raises(ValueError, match="model.onnx: it is a JPEG image, not an ONNX model"):
        build_engine("rmbg-2.0", photo, runtime="openvino")


def rmbg(*args, python_prefix=""):
    """The CLI in a fresh process; `python_prefix` runs first (to hide a package)."""
    code = f"{python_prefix}import sys; from rmbg_demo.cli import main; sys.exit(main({json.dumps(list(args))}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=hermetic_env())


def test_cli_remove_on_openvino_matches_onnxruntime(tmp_path):
    photo = "assets/chelsea.jpg"
    results = {}
    for runtime in ("openvino", "onnxruntime"):
        run = rmbg("remove", photo, "-o", str(tmp_path / runtime), "--model", "u2netp", "--runtime", runtime)
        assert run.returncode == 0, run.stderr
        results[runtime] = run
    assert "openvino" in results["openvino"].stderr and "f32, exact" in results["openvino"].stderr
    alphas = [np.asarray(Image.open(tmp_path / runtime / "chelsea.png"))[..., 3].astype(int) for runtime in results]
    assert alphas[0].shape == Image.open(photo).size[::-1]
    assert np.abs(alphas[0] - alphas[1]).max() <= 1


HIDE_OPENVINO = "import sys; sys.modules['openvino'] = None; "


def test_without_openvino_auto_still_runs_and_openvino_says_how_to_install(tmp_path):
    auto = rmbg("remove", "assets/chelsea.jpg", "-o", str(tmp_path / "auto"), "--model", "u2netp",
                python_prefix=HIDE_OPENVINO)
    assert auto.returncode == 0, auto.stderr
    assert (tmp_path / "auto" / "chelsea.png").is_file()
    asked = rmbg("remove", "assets/chelsea.jpg", "-o", str(tmp_path / "ov"), "--model", "u2netp", "--runtime",
                 "openvino", python_prefix=HIDE_OPENVINO)
    assert asked.returncode != 0
    assert "needs the openvino package" in asked.stderr and "pip install 'rmbg-demo[openvino]'" in asked.stderr
    assert not (tmp_path / "ov").exists() or not any((tmp_path / "ov").iterdir())


def test_without_openvino_auto_keeps_pytorch(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr("rmbg_demo.engines.ov.cpu_runs_bf16", lambda: True)
    for name in ("rmbg-2.0", "birefnet-lite"):
        assert auto_runtime(get_spec(name), None, "cpu", "auto") == "torch"
