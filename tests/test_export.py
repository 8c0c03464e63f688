"""ONNX export and the ONNX Runtime engine, on the fixture weights at small sizes.

Each network is exported once per module (the Swin-L one is the slow part); the files are then
run by ONNX Runtime on real photos and compared with the PyTorch network.
"""
import logging
import math

import numpy as np
import onnx
import onnxruntime as ort
import parity
import pytest
import torch
from helpers import ASSETS
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from rmbg_demo import build_model, get_spec
from rmbg_demo.engines.ort import OnnxEngine, OnnxModelError
from rmbg_demo.export import (
    METADATA_KEYS,
    ExportCheckError,
    check_size,
    export_onnx,
    normalise,
    verify_onnx,
)
from rmbg_demo.models.u2netp import bundled_onnx_path
from rmbg_demo.pipeline import RemovalPipeline

SIZE = 256
PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")


def photos(model_name, size=(SIZE, SIZE), count=3) -> torch.Tensor:
    """Real photos, resized and normalised as the model's card does: (count, 3, H, W)."""
    pixels = [np.asarray(Image.open(ASSETS / name).convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR))
              for name in PHOTOS[:count]]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return normalise(images, get_spec(model_name))


def run_file(session: ort.InferenceSession, *batches: torch.Tensor) -> list[torch.Tensor]:
    """The file as any ONNX Runtime user runs it: its raw `logits` output for each batch."""
    return [torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0]) for x in batches]


@pytest.fixture(scope="module")
def rmbg14_fixture_model():
    model = build_model("rmbg-1.4")
    assert not model.load_state_dict(parity.deterministic_state_dict(model), strict=False).missing_keys
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, rmbg2_fixture_model, lite_fixture_model, rmbg14_fixture_model):
    """name -> (ONNX file, network); float32 at 256x256. Exported lazily, each at most once per module."""
    networks = {"rmbg-2.0": rmbg2_fixture_model, "birefnet-lite": lite_fixture_model,
                "rmbg-1.4": rmbg14_fixture_model}
    files = {}

    def get(name):
        if name not in files:
            path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
            # The Swin files skip the export's own check (the tests below compare them on real photos);
            # RMBG-1.4's export checks itself, at two batch sizes and two image sizes.
            report = export_onnx(name, path, network=networks[name], size=SIZE, check=name == "rmbg-1.4")
            files[name] = (report, networks[name])
        return files[name]
    return get


@pytest.fixture(scope="module")
def engine_of(exported):
    """name -> the OnnxEngine of its exported file, opened once (a Swin graph takes ONNX Runtime 10-30 s to
    open on 2 cores); `engine.session` is the plain onnxruntime session any user would make."""
    engines = {}

    def get(name):
        if name not in engines:
            engines[name] = OnnxEngine(exported(name)[0].path)
        return engines[name]
    return get


@pytest.mark.parametrize("name", ["rmbg-2.0", "birefnet-lite", "rmbg-1.4"])
def test_exported_file_matches_the_network_at_batch_1_and_2(exported, engine_of, name):
    report, network = exported(name)
    engine = engine_of(name)
    x = photos(name, count=2)
    with torch.no_grad():
        expected = network(x)[get_spec(name).output_index]
    for got, want in zip(run_file(engine.session, x[:1], x), (expected[:1], expected)):
        assert got.shape == want.shape == (len(want), 1, SIZE, SIZE)
        assert (got - want).abs().max() <= 1e-3 * want.std()
    # The engine gives the same map as a probability, the activation the metadata names applied.
    probability = expected[:1].sigmoid() if name != "rmbg-1.4" else _minmax(expected[:1])
    assert (engine(x[:1]) - probability).abs().max() < 1e-4


def _minmax(maps):
    low, high = maps.amin(dim=(1, 2, 3), keepdim=True), maps.amax(dim=(1, 2, 3), keepdim=True)
    return (maps - low) / (high - low)


def test_rmbg14_file_takes_any_size_birefnet_files_keep_theirs(exported, engine_of, rmbg14_fixture_model):
    rmbg14, _ = exported("rmbg-1.4")
    assert rmbg14.dynamic_axes == ("batch", "height", "width")
    assert rmbg14.check.worst <= 1e-3 and set(rmbg14.check.errors) == {"1x256x256", "2x256x256", "1x320x288"}
    x = photos("rmbg-1.4", size=(320, 288), count=2)
    with torch.no_grad():
        expected = rmbg14_fixture_model(x)[0]
    assert (run_file(engine_of("rmbg-1.4").session, x)[0] - expected).abs().max() <= 1e-3 * expected.std()

    lite, _ = exported("birefnet-lite")
    assert lite.dynamic_axes == ("batch",)
    shape = onnx.load(str(lite.path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in shape] == ["batch", 3, SIZE, SIZE]
    with pytest.raises(OnnxModelError, match="fixed 256x256"):
        OnnxEngine(lite.path, input_size=(320, 320))
    with pytest.raises(ValueError, match="takes 256x256"):
        OnnxEngine(lite.path)(torch.zeros(1, 3, 320, 256))


def test_file_format_and_metadata(exported, engine_of):
    report, _ = exported("birefnet-lite")
    model = onnx.load(str(report.path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(METADATA_KEYS) <= set(meta)
    assert meta["model"] == "birefnet-lite" and meta["activation"] == "sigmoid" and meta["dtype"] == "float32"
    assert (meta["input_height"], meta["input_width"], meta["opset"]) == ("256", "256", "17")
    assert meta["mean"] == "0.485,0.456,0.406" and meta["std"] == "0.229,0.224,0.225"
    assert meta["licence"] == "MIT" and torch.__version__ in meta["exporter"]
    # The deformable convolutions went through grid_sample, not torchvision's kernel (no ONNX form).
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" in ops and "DeformConv" not in ops
    # The height and width are fixed, so the shift masks and sampling grids are constants in the file,
    # not rebuilt from the input's shape at every run (slice assignments, ranges).
    assert not {"ScatterND", "Range"} & ops
    engine = engine_of("birefnet-lite")
    assert (engine.model_name, engine.input_size, engine.activation) == ("birefnet-lite", (256, 256), "sigmoid")
    assert engine.mean == (0.485, 0.456, 0.406) and engine.std == (0.229, 0.224, 0.225)
    assert engine.name == "onnxruntime" and engine.device == "cpu" and "CPUExecutionProvider" in engine.describe()

    rmbg14 = engine_of("rmbg-1.4")
    assert (rmbg14.activation, rmbg14.mean, rmbg14.std) == ("minmax", (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))


def test_file_holds_the_weights_not_masks_expanded_to_the_image(exported, lite_fixture_model):
    """The Swin shift masks reach the file as their (windows, N) region labels, not folded into one
    (windows, heads, N, N) constant per shifted block: those added 6 % to BiRefNet lite's numbers at
    256 and grow with the image (RMBG-2.0's file at 1024 was 2.4x its weights). (Not the largest
    constant against the largest weight: at 256 the largest mask, 0.7 M numbers, is under 2.4 M.)"""
    report, _ = exported("birefnet-lite")
    graph = onnx.load(str(report.path), load_external_data=False).graph
    constants = [*graph.initializer, *(attribute.t for node in graph.node if node.op_type == "Constant"
                                       for attribute in node.attribute if attribute.name == "value")]
    numbers = sum(math.prod(tensor.dims) for tensor in constants)
    weights = sum(tensor.numel() for tensor in lite_fixture_model.state_dict().values())
    # What is over: each block's position bias gathered from its table, once for both backbone passes.
    assert numbers <= 1.02 * weights


def test_float16_export_keeps_masks_within_3_of_255(tmp_path, lite_fixture_model):
    random = torch.Generator().manual_seed(0)
    features, weight = (torch.randn(shape, generator=random).half() for shape in ((1, 512, 16, 16), (4, 512, 3, 3)))
    before = torch.nn.functional.conv2d(features, weight)  # PyTorch's own float16 kernel
    report = export_onnx("birefnet-lite", tmp_path / "lite16.onnx", network=lite_fixture_model, size=SIZE,
                         dtype="float16")
    # The export's float32 stand-in for float16 CPU convolutions is gone again (it rounds differently).
    assert torch.equal(torch.nn.functional.conv2d(features, weight), before)
    assert report.check.dtype == "float16" and report.check.worst <= 3 / 255
    engine = OnnxEngine(report.path)
    assert engine.dtype == "float16"
    x = photos("birefnet-lite", count=1)  # (float16 runs slowly on CPUs: one real photo beside the check's two)
    with torch.no_grad():
        expected = lite_fixture_model(x)[-1].sigmoid()
    got = engine(x)  # float32 in and out; the engine casts
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() * 255 <= 3
    # The network given was not turned into float16 in place.
    assert next(lite_fixture_model.parameters()).dtype == torch.float32


def test_check_refuses_a_file_that_disagrees(tmp_path, exported, lite_fixture_model):
    # (The check passing on good files: the RMBG-1.4 and float16 exports above run it.)
    report, _ = exported("birefnet-lite")
    # One weight of the file changed: the file no longer computes what the network does.
    model = onnx.load(str(report.path))
    weight = next(t for t in model.graph.initializer if t.name.endswith("patch_embed.proj.weight"))
    values = numpy_helper.to_array(weight) * 1.05  # the backbone's first convolution, 5 % larger
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    corrupted = tmp_path / "corrupted.onnx"
    onnx.save(model, str(corrupted))
    with pytest.raises(ExportCheckError, match="disagrees with the PyTorch network"):
        verify_onnx(corrupted, lite_fixture_model, batch_sizes=(1,))


class TracesDifferently(torch.nn.Module):
    """A network whose trace is not what it computes (a branch the tracer freezes): what the check is for."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        return [out * 2 if torch.jit.is_tracing() else out]


class SmallConvolutions(torch.nn.Module):
    """A network the exporter traces faithfully, with weights over ONNX's 1 kB external-data threshold."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.head = torch.nn.Conv2d(16, 1, 1)

    def forward(self, x):
        return [self.head(self.conv(x).relu())]


@pytest.fixture
def exporter_above_2gb(monkeypatch):
    """torch.onnx.export as it writes a graph above protobuf's 2 GB limit, for any network: each tensor
    in a file of its own beside the model (RMBG-2.0 at 1024 was 292 files)."""
    export = torch.onnx.export

    def export_in_loose_files(model, args, f, **options):
        export(model, args, f, **options)
        onnx.save_model(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0, convert_attribute=True)
    monkeypatch.setattr(torch.onnx, "export", export_in_loose_files)


@pytest.mark.parametrize("above_2gb", [False, True])
def test_export_that_disagrees_leaves_no_file(tmp_path, request, above_2gb):
    if above_2gb:
        request.getfixturevalue("exporter_above_2gb")
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ExportCheckError, match="was not written"):
        export_onnx("rmbg-2.0", out, network=TracesDifferently(), size=SIZE)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporaries


def test_export_above_2gb_is_one_model_and_one_data_file(tmp_path, monkeypatch, exporter_above_2gb):
    out = tmp_path / "x.onnx"
    x = photos("rmbg-2.0", count=1)

    def assert_file_computes(network):
        with torch.no_grad():
            expected = network(x)[0]
        assert (run_file(OnnxEngine(out).session, x)[0] - expected).abs().max() <= 1e-4 * expected.std()

    first = SmallConvolutions()
    stale = tmp_path / "x.onnx.data"  # another export's data, without its model
    stale.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="x.onnx.data exists"):
        export_onnx("rmbg-2.0", out, network=first, size=SIZE, check=False)
    assert [p.name for p in tmp_path.iterdir()] == ["x.onnx.data"] and stale.read_bytes() == b"keep me"
    stale.unlink()
    report = export_onnx("rmbg-2.0", out, network=first, size=SIZE)  # checked by ONNX Runtime, batch 1 and 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx", "x.onnx.data"]
    assert report.data_path == tmp_path / "x.onnx.data"
    assert report.file_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert report.data_path.stat().st_mode == out.stat().st_mode  # whoever may read the model may read its data
    graph = onnx.load(str(out), load_external_data=False).graph
    assert {entry.value for tensor in graph.initializer for entry in tensor.external_data
            if entry.key == "location"} == {"x.onnx.data"}
    assert get_spec(OnnxEngine(out).model_name).name == "rmbg-2.0"  # the metadata is there too
    assert_file_computes(first)

    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx("rmbg-2.0", out, network=SmallConvolutions(), size=SIZE)
    assert_file_computes(first)
    second = SmallConvolutions()
    export_onnx("rmbg-2.0", out, network=second, size=SIZE, overwrite=True)  # both files replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx", "x.onnx.data"]
    assert_file_computes(second)
    monkeypatch.undo()  # the exporter as it is below 2 GB: the model in one file, the old data removed
    export_onnx("rmbg-2.0", out, network=first, size=SIZE, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x.onnx"]
    assert_file_computes(first)


def test_export_refuses_bad_requests(tmp_path):
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx("rmbg-2.0", existing, network=TracesDifferently(), size=SIZE)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="already an ONNX model"):
        export_onnx("u2netp", tmp_path / "u.onnx")
    with pytest.raises(ValueError, match="opset 16"):
        export_onnx("rmbg-2.0", tmp_path / "x.onnx", opset=15)
    with pytest.raises(ValueError, match="float16"):
        export_onnx("rmbg-2.0", tmp_path / "x.onnx", dtype="int8")
    with pytest.raises(ValueError, match="multiple of 32"):
        export_onnx("rmbg-2.0", tmp_path / "x.onnx", size=1000)


def test_export_sizes_follow_the_one_size_rule():
    assert check_size(512) == (512, 512) and check_size((1024, 768)) == (1024, 768)
    for bad in (1000, (1024, 100), 4096):
        with pytest.raises(ValueError, match="multiple of 32 from 256 to 2048"):
            check_size(bad)


def test_embedded_u2netp_through_the_engine_equals_the_pipeline():
    pipeline = RemovalPipeline("u2netp")
    images = [Image.open(ASSETS / name) for name in PHOTOS]
    engine = OnnxEngine(bundled_onnx_path())
    assert engine.activation == "minmax"  # read from the graph: its map comes out of a Sigmoid
    assert engine.input_size == (320, 320) and engine.fixed_batch == 1 and engine.mean is None
    batch = torch.cat([pipeline.preprocess(image) for image in images])  # batch of 3, file fixed at 1
    assert torch.equal(engine(batch), pipeline.predict_probabilities(images))


def test_cuda_request_says_where_it_runs(caplog):
    with caplog.at_level(logging.WARNING, logger="rmbg_demo.engines.ort"):
        engine = OnnxEngine(bundled_onnx_path(), device="cuda")
    if "CUDAExecutionProvider" in engine.providers or "TensorrtExecutionProvider" in engine.providers:
        assert engine.device == "cuda" and "WARNING" not in engine.describe()
    else:  # this onnxruntime (or machine) has no GPU provider: it must not pass silently
        assert engine.device == "cpu" and engine.fallback
        assert "CPU although CUDA was asked for" in caplog.text
        assert "WARNING" in engine.describe() and "CPU" in engine.describe()


def _tiny_model(path, input_shape, outputs=True):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y] if outputs else [])
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bad_files_give_clear_errors(tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(bundled_onnx_path().read_bytes()[:100_000])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    png = tmp_path / "mask.onnx"
    png.write_bytes((ASSETS / "horse_mask.png").read_bytes())
    cases = [(truncated, "truncated or corrupt"), (text, "text file, not an ONNX model"),
             (png, "PNG image, not an ONNX model"),
             (_tiny_model(tmp_path / "gray.onnx", [1, 1, 64, 64]), r"expected \(B, 3, H, W\)"),
             (_tiny_model(tmp_path / "flat.onnx", [1, 3, 64]), r"expected \(B, 3, H, W\)"),
             (_tiny_model(tmp_path / "none.onnx", [1, 3, 64, 64], outputs=False), "no outputs")]
    for path, message in cases:
        with pytest.raises(OnnxModelError, match=message):
            OnnxEngine(path)
    with pytest.raises(OnnxModelError, match="fixed 320x320"):
        OnnxEngine(bundled_onnx_path(), input_size=(1024, 1024))
    with pytest.raises(FileNotFoundError):
        OnnxEngine(tmp_path / "missing.onnx")
    assert issubclass(OnnxModelError, ValueError)


def test_cli_runs_an_exported_file_like_the_pytorch_weights(exported, rmbg14_fixture_model, tmp_path):
    """`rmbg remove photo --weights model.onnx`: the file says which model and size it is; the mask is the
    PyTorch path's within 2/255."""
    from helpers import rmbg_in_process
    from safetensors.torch import save_file

    report, _ = exported("rmbg-1.4")
    checkpoint = tmp_path / "rmbg14.safetensors"
    save_file(rmbg14_fixture_model.state_dict(), str(checkpoint))
    masks = {}
    for kind, extra in (("onnx", ["--weights", report.path]),
                        ("torch", ["--model", "rmbg-1.4", "--weights", checkpoint, "--size", SIZE, "--dtype", "float32"])):
        run = rmbg_in_process("remove", ASSETS / "chelsea.jpg", "-o", tmp_path / kind, "--mask", "-q", *extra)
        assert run.returncode == 0, run.stderr
        assert f"[rmbg-1.4] at {SIZE}x{SIZE}, {'rmbg-1.4 (' if kind == 'onnx' else 'torch'}" in run.stderr
        masks[kind] = np.asarray(Image.open(tmp_path / kind / "chelsea_mask.png"), dtype=int)
    assert np.abs(masks["onnx"] - masks["torch"]).max() <= 2
    run = rmbg_in_process("remove", ASSETS / "chelsea.jpg", "-o", tmp_path / "wrong", "--model", "rmbg-2.0",
                          "--weights", report.path)
    assert run.returncode == 2 and "is an export of rmbg-1.4, not rmbg-2.0" in run.stderr
