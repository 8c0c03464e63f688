"""load_model reads real checkpoint files, the hub cache and the hub protocol, and names each problem."""
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import parity
import pytest
import torch
from helpers import FIXTURES, CountingHub, hermetic_env, hub_cache_with
from safetensors.torch import save_file

from rmbg_demo import WeightsError, load_model, resolve_weights, weights_available

NAME = "birefnet-lite"  # the published layout at a fifth of RMBG-2.0's size keeps files small


@pytest.fixture(scope="module")
def state(lite_fixture_model):
    """The fixture weights, complete with the derived buffers, as a checkpoint would hold them."""
    full = {k: v.clone() for k, v in lite_fixture_model.state_dict().items()}
    return full


@pytest.fixture(scope="module")
def safetensors_file(lite_weights_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"  # alone in its folder
    os.symlink(lite_weights_file, path)
    return path


def assert_same_weights(model, state):
    ours = model.state_dict()
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def test_loads_safetensors_and_computes_the_published_outputs(safetensors_file, state):
    model = load_model(NAME, weights=safetensors_file)
    assert not model.training
    assert_same_weights(model, state)
    with torch.no_grad():
        outputs = model(parity.deterministic_input(256, 256))
    assert max(r for _, _, r in parity.compare(outputs, str(FIXTURES / "rmbg2" / "lite_public_256.npz"))) < 1e-3


def test_loads_pth_with_a_ddp_prefix_and_without_derived_buffers(state, tmp_path):
    kept = {f"module.{k}": v for k, v in state.items()
            if not k.endswith(("relative_position_index", "num_batches_tracked"))}
    path = tmp_path / "birefnet.pth"
    torch.save(kept, path)
    assert_same_weights(load_model(NAME, weights=path), {k[7:]: v for k, v in kept.items()})


@pytest.mark.parametrize("suffix, wrapper, prefix", [(".bin", "state_dict", "_orig_mod."), (".pt", "model", "model.")])
def test_loads_wrapped_prefixed_half_precision_checkpoints(state, tmp_path, suffix, wrapper, prefix):
    # Trainers save {"state_dict": ...} (Lightning) or {"model": ...}, torch.compile adds
    # "_orig_mod.", wrappers "model."; weights saved in float16 load as the network's float32.
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / f"checkpoint{suffix}"
    torch.save({wrapper: {f"{prefix}{k}": v for k, v in half.items()}, "epoch": 3}, path)
    model = load_model(NAME, weights=path)
    assert model.decoder.conv_out1[0].weight.dtype == torch.float32
    assert_same_weights(model, {k: v.to(state[k].dtype) for k, v in half.items()})


def test_rmbg14_falls_back_to_pytorch_model_bin_in_the_hub_cache(tmp_path, monkeypatch):
    # briaai/RMBG-1.4 published pytorch_model.bin before model.safetensors; a cache holding only
    # the .bin must load, without asking the hub (HF_ENDPOINT is closed in tests).
    from rmbg_demo import build_model

    with torch.device("meta"):
        meta = build_model("rmbg-1.4")
    fixture = {k: v.half() for k, v in parity.deterministic_state_dict(meta).items()}  # half: a smaller file
    torch.save(fixture, tmp_path / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache_with(tmp_path / "hub", "briaai/RMBG-1.4",
                                                          {"pytorch_model.bin": tmp_path / "pytorch_model.bin"})))
    assert resolve_weights("rmbg-1.4").name == "pytorch_model.bin"
    assert weights_available("rmbg-1.4")
    model = load_model("rmbg-1.4")
    assert_same_weights(model, {k: v.float() for k, v in fixture.items()})


def test_loads_a_folder_and_casts_to_the_dtype_asked(safetensors_file, state):
    model = load_model(NAME, weights=safetensors_file.parent, dtype=torch.bfloat16)
    assert model.decoder.conv_out1[0].weight.dtype == torch.bfloat16
    assert model.bb.layers[0].blocks[0].attn.relative_position_index.dtype == torch.int64


def broken(state, tmp_path, change):
    edited = dict(state)
    change(edited)
    path = tmp_path / "broken.safetensors"
    save_file(edited, str(path))
    return path


def test_missing_key_is_named(state, tmp_path):
    path = broken(state, tmp_path, lambda s: s.pop("decoder.conv_out1.0.bias"))
    with pytest.raises(WeightsError, match=r"broken.safetensors does not fit the network: 1 missing keys: decoder.conv_out1.0.bias$"):
        load_model(NAME, weights=path)


def test_unexpected_key_is_named(state, tmp_path):
    path = broken(state, tmp_path, lambda s: s.__setitem__("decoder.extra_head.weight", torch.zeros(3)))
    with pytest.raises(WeightsError, match=r"1 unexpected keys: decoder.extra_head.weight$"):
        load_model(NAME, weights=path)


def test_misshaped_key_is_named_with_both_shapes(state, tmp_path):
    path = broken(state, tmp_path, lambda s: s.__setitem__("decoder.conv_out1.0.weight", torch.zeros(1, 99, 1, 1)))
    with pytest.raises(WeightsError, match=r"1 mis-shaped keys: decoder.conv_out1.0.weight \(1, 99, 1, 1\) != \(1, 120, 1, 1\)"):
        load_model(NAME, weights=path)


def test_many_missing_keys_are_counted(state, tmp_path):
    def drop_decoder(s):
        for key in [k for k in s if k.startswith("decoder.")]:
            del s[key]
    path = broken(state, tmp_path, drop_decoder)
    with pytest.raises(WeightsError, match=r"\d{3} missing keys: decoder\.[^,]+(, decoder\.[^,]+){4}, \.\.\. \(\d+ more\)"):
        load_model(NAME, weights=path)


def test_other_networks_checkpoint_is_refused(safetensors_file):
    with pytest.raises(WeightsError, match=r"156 missing keys: bb.layers.2.blocks.6.norm1.weight, .*; 247 mis-shaped keys: "):
        load_model("rmbg-2.0", weights=safetensors_file)


def test_missing_file_folder_and_garbage(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nothing.safetensors"):
        load_model(NAME, weights=tmp_path / "nothing.safetensors")
    with pytest.raises(WeightsError, match="no weights file .* in folder"):
        load_model(NAME, weights=tmp_path)
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights from .*model.safetensors"):
        load_model(NAME, weights=garbage)


def test_environment_variable_names_the_rmbg2_file(tmp_path, monkeypatch):
    path = tmp_path / "rmbg.safetensors"
    path.write_bytes(b"x")
    monkeypatch.setenv("RMBG_WEIGHTS", str(path))
    assert resolve_weights("rmbg-2.0") == path
    assert weights_available("rmbg-2.0")


def test_hub_cache_is_used_offline(safetensors_file, tmp_path, monkeypatch):
    hub_cache_with(tmp_path / "hub", "ZhengPeng7/BiRefNet_lite", {"model.safetensors": safetensors_file})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_weights(NAME).name == "model.safetensors"
    assert resolve_weights(NAME).resolve() == safetensors_file.resolve()
    assert weights_available(NAME)
    assert not weights_available("rmbg-2.0")
    with pytest.raises(WeightsError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download "
                                           r"model.safetensors from https://huggingface.co/briaai/RMBG-2.0 .* "
                                           r"--weights FILE .*RMBG_WEIGHTS"):
        load_model("rmbg-2.0")


class GatedHub(BaseHTTPRequestHandler):
    """Answers like the hub does for a gated repo whose licence the user has not accepted."""

    def do_HEAD(self):
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model briaai/RMBG-2.0 is restricted.")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


def load_in_subprocess(endpoint, tmp_path):
    # huggingface_hub reads HF_ENDPOINT when imported, hence a fresh interpreter.
    env = hermetic_env(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path), HF_TOKEN="hf_test", HF_HUB_OFFLINE="0",
                       HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3")
    code = "from rmbg_demo import load_model\ntry:\n load_model('rmbg-2.0')\nexcept Exception as e:\n print(e)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout


def test_gated_repo_says_to_accept_the_licence_and_set_hf_token(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        message = load_in_subprocess(f"http://127.0.0.1:{server.server_port}", tmp_path)
    finally:
        server.shutdown()
    assert "rmbg-2.0 is gated on the Hugging Face hub: accept its licence at https://huggingface.co/briaai/RMBG-2.0" in message
    assert "set HF_TOKEN" in message and "--weights FILE" in message


def test_no_network_says_how_to_pass_weights(tmp_path):
    with socket_closed_port() as port:
        message = load_in_subprocess(f"http://127.0.0.1:{port}", tmp_path)
    assert "rmbg-2.0 weights are not here and the Hugging Face hub cannot be reached (no network?)" in message
    assert "--weights FILE" in message


class socket_closed_port:
    """A local port with nothing listening on it."""

    def __enter__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def test_deciding_what_is_available_never_asks_the_hub(safetensors_file, tmp_path):
    """`weights_available` and `rmbg models` decide from local files only: a hub stand-in that
    counts every connection sees none, whether the weights are cached (birefnet-lite) or not."""
    hub = CountingHub()
    cache = hub_cache_with(tmp_path / "hub", "ZhengPeng7/BiRefNet_lite", {"model.safetensors": safetensors_file})
    code = ("from rmbg_demo.models import model_names\nfrom rmbg_demo.weights import weights_available\n"
            "print({name: weights_available(name) for name in model_names()})\n"
            "from rmbg_demo.cli import main\nmain(['models'])")
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env=hermetic_env(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache)))
    finally:
        hub.stop()
    assert run.returncode == 0, run.stderr
    available, *listing = run.stdout.splitlines()
    assert available == ("{'rmbg-2.0': False, 'birefnet-general': False, 'birefnet-lite': True, 'rmbg-1.4': False, "
                         "'u2netp': True}")
    lines = {line.split()[0]: line for line in listing}
    assert lines["birefnet-lite"].endswith("| available") and "downloads on first use" in lines["rmbg-1.4"]
    assert hub.connections == 0 and hub.requests == []
