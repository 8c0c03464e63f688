"""The network computes what the published RMBG-2.0 / BiRefNet code computes."""
import copy

import parity
import pytest
import torch
from helpers import FIXTURES

from rmbg_demo import build_model, model_names

TOLERANCE = 1e-3  # of each reference map's standard deviation


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Parity is checked in full float32 (conftest's restore_torch_settings puts it back)."""
    torch.set_float32_matmul_precision("highest")


def read_layout(name):
    rows = (line.rstrip("\n").split("\t") for line in open(FIXTURES / "rmbg2" / name))
    return {key: tuple(int(d) for d in shape.strip("[]").split(",") if d.strip()) for key, shape, _ in rows}


@pytest.mark.parametrize("name, layout, count", [
    ("rmbg-2.0", "state_dict_keys.tsv", 754),
    ("birefnet-general", "state_dict_keys.tsv", 754),
    ("birefnet-lite", "birefnet_lite_state_dict_keys.tsv", 586),
    ("rmbg-1.4", "rmbg14_state_dict_keys.tsv", 798),
])
def test_state_dict_is_the_published_layout(name, layout, count):
    with torch.device("meta"):
        model = build_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    published = read_layout(layout)
    assert len(published) == count
    assert ours == published
    assert not model.training


def test_rmbg2_has_220m_parameters():
    with torch.device("meta"):
        model = build_model("rmbg-2.0")
    parameters = sum(p.numel() for p in model.parameters())
    values = sum(t.numel() for t in model.state_dict().values())
    assert round(parameters / 1e6, 1) == 220.2
    assert round(values / 1e6, 1) == 220.7  # the figure in shared/rmbg2/README.md, buffers included


def run(model, h, w):
    with torch.no_grad():
        return model(parity.deterministic_input(h, w))


def assert_parity(outputs, reference):
    report = parity.compare(outputs, str(FIXTURES / "rmbg2" / reference))
    assert len(report) == 4
    for shape, _, relative in report:
        assert relative < TOLERANCE, f"map {shape}: {relative:.2e} of std"
    return report


@pytest.mark.parametrize("h, w, reference", [(256, 256, "public_256.npz"), (320, 448, "public_320x448.npz")])
def test_rmbg2_matches_published_outputs(rmbg2_fixture_model, h, w, reference):
    outputs = run(rmbg2_fixture_model, h, w)
    assert [tuple(o.shape[-2:]) for o in outputs] == [(h // 32, w // 32), (h // 16, w // 16), (h // 8, w // 8), (h, w)]
    assert_parity(outputs, reference)


def test_lite_matches_published_outputs(lite_fixture_model):
    assert_parity(run(lite_fixture_model, 256, 256), "lite_public_256.npz")


def test_rmbg14_matches_published_side_outputs():
    model = build_model("rmbg-1.4")
    assert not model.load_state_dict(parity.deterministic_state_dict(model), strict=False).missing_keys
    with torch.no_grad():
        outputs = model(parity.deterministic_image(256, 256) - 0.5)  # RMBG-1.4: mean 0.5, std 1
    report = parity.compare(outputs, str(FIXTURES / "rmbg2" / "rmbg14_public_256.npz"))
    assert len(report) == 6
    assert all(shape == (1, 1, 256, 256) and relative < TOLERANCE for shape, _, relative in report), report


def test_model_card_usage_works(rmbg2_fixture_model):
    """The model card's `model(x)[-1].sigmoid()` on our network gives the published network's
    probabilities, and the pipeline's float32 probabilities are that same call."""
    import numpy as np

    from rmbg_demo.pipeline import RemovalPipeline

    x = parity.deterministic_input(256, 256)
    with torch.no_grad():
        card = rmbg2_fixture_model(x)[-1].sigmoid()
    assert card.shape == (1, 1, 256, 256)
    published = torch.from_numpy(np.load(FIXTURES / "rmbg2" / "public_256.npz")["out3"]).sigmoid()
    assert float(published.std()) > 0.02  # a map with structure, not a constant
    assert float((card - published).abs().max()) < 1e-2 * float(published.std())
    pipeline = RemovalPipeline("rmbg-2.0", network=rmbg2_fixture_model, device="cpu", dtype="float32",
                               input_size=(256, 256))
    ours = pipeline.engine(x)
    assert ours.dtype == torch.float32 and torch.allclose(ours, card, atol=1e-5)


def test_parity_detects_a_five_percent_change_in_the_last_swin_stage(rmbg2_fixture_model):
    # One weight tensor scaled by 1.05 moves the coarse map by ~3e-2 of its std (measured);
    # a single scalar of it moves it by ~3e-5, below the float32 agreement itself (~6e-6
    # to 1e-5), so the tensor is what a parity check can and must catch.
    model = copy.deepcopy(rmbg2_fixture_model)
    with torch.no_grad():
        model.bb.layers[3].blocks[1].mlp.fc2.weight.mul_(1.05)
    report = parity.compare(run(model, 256, 256), str(FIXTURES / "rmbg2" / "public_256.npz"))
    assert max(relative for _, _, relative in report) > TOLERANCE


def test_batch_of_two_equals_two_single_runs(lite_fixture_model):
    a = parity.deterministic_input(256, 256)
    b = torch.flip(a, dims=[-1])
    with torch.no_grad():
        batched = lite_fixture_model(torch.cat([a, b]))[-1]
        single = torch.cat([lite_fixture_model(a)[-1], lite_fixture_model(b)[-1]])
    assert torch.allclose(batched, single, atol=1e-4)


# Half precision: measured max |p - p_fp32| on the 256x256 fixture was 0.0032 (bf16) and
# 0.0005 (fp16) for the probability maps; 0.01 leaves room across CPUs.
HALF_TOLERANCE = 0.01


def probability_gap(outputs, reference):
    return max(float((o.float().sigmoid() - r.sigmoid()).abs().max()) for o, r in zip(outputs, reference))


def test_bfloat16_autocast_and_cast_agree_with_float32(lite_fixture_model):
    # BiRefNet lite runs the same code as RMBG-2.0 with a smaller Swin, here at a small size: on
    # CPUs without native bfloat16 (emulated, ~10x slower) the large network took minutes.
    x = parity.deterministic_input(128, 128)
    with torch.no_grad():
        reference = lite_fixture_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = lite_fixture_model(x)
        cast_model = copy.deepcopy(lite_fixture_model).to(torch.bfloat16)
        cast = cast_model(x.to(torch.bfloat16))
    assert autocast[-1].dtype == torch.bfloat16 and cast[-1].dtype == torch.bfloat16
    assert probability_gap(autocast, reference) < HALF_TOLERANCE
    assert probability_gap(cast, reference) < HALF_TOLERANCE


def test_float16_cast_agrees_with_float32(lite_fixture_model):
    # float16 convolutions are slow on CPU: the small network at a small size keeps this quick.
    x = parity.deterministic_input(128, 128)
    with torch.no_grad():
        reference = lite_fixture_model(x)
        half = copy.deepcopy(lite_fixture_model).half()(x.half())
    assert half[-1].dtype == torch.float16
    assert probability_gap(half, reference) < HALF_TOLERANCE


def test_registry_lists_the_networks_and_the_embedded_model():
    assert {"rmbg-2.0", "birefnet-general", "birefnet-lite", "u2netp"} <= set(model_names())
    with pytest.raises(ValueError, match="unknown model 'nope'.*rmbg-2.0"):
        build_model("nope")
    with pytest.raises(ValueError, match="onnx"):
        build_model("u2netp")


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_cpu_deformable_convolution_equals_torchvision(kernel):
    from torchvision.ops import deform_conv2d

    from rmbg_demo.models.birefnet import deform_conv2d_sampled

    generator = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 8, 20, 24, generator=generator)
    taps = kernel * kernel
    offset = torch.randn(2, 2 * taps, 20, 24, generator=generator) * 4  # reaches past the borders too
    mask = torch.rand(2, taps, 20, 24, generator=generator) * 2
    weight = torch.randn(5, 8, kernel, kernel, generator=generator)
    expected = deform_conv2d(x, offset, weight, padding=(kernel // 2, kernel // 2), mask=mask)
    ours = deform_conv2d_sampled(x, offset, weight, mask, kernel // 2)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_for_conversion_the_network_uses_torchvisions_op_and_computes_the_same(lite_fixture_model):
    """What OpenVINO's converter traces: torchvision's deform_conv2d (its DeformableConvolution) in place of the
    sampled form, the same outputs, and the network as it was afterwards."""
    from unittest import mock

    from rmbg_demo.models import get_spec

    image = parity.deterministic_input(256, 256)
    with torch.no_grad():
        sampled = lite_fixture_model(image)[-1]
        with get_spec("birefnet-lite").for_conversion(lite_fixture_model) as network, \
                mock.patch("rmbg_demo.models.birefnet.deform_conv2d_sampled", side_effect=AssertionError("sampled")):
            converted = network(image)[-1]
        again = lite_fixture_model(image)[-1]
    assert torch.allclose(converted, sampled, atol=1e-3) and torch.equal(again, sampled)
