"""The PyTorch engine: our networks on a CPU, CUDA or MPS device, in the precision that suits it."""
from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models import Activation
from ..processing import activate

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Beyond the compute types, an explicit CPU choice: the Linear layers (Swin's attention and MLPs) in int8
# with activations quantized per call, everything else in float32 (bench/runtimes.py measures it).
INT8 = "int8"
DTYPE_CHOICES = (*DTYPES, INT8)


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto': CUDA, then Apple's MPS, then the CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bfloat16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16, AMX), where oneDNN runs them ~2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles for bf16 (Intel Sapphire Rapids and later), as the kernel reports them."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_bf16" in line for line in cpuinfo)
    except OSError:  # not Linux: no way to tell without changing the process's state; assume none
        return False


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': float16 on CUDA, bfloat16 on CPUs with native bf16, else float32.

    Both half types keep masks within 2/255 of float32 with RMBG-2.0's weights at 1024 (bench/RESULTS.md),
    within 3/255 with the tests' fixture weights; the deformable convolutions compute in float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == INT8:  # int8 weights, float32 everything else
        return torch.float32
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bfloat16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPE_CHOICES)}") from None


class Float32Arithmetic(TorchFunctionMode):
    """bfloat16 convolutions and Linear layers computed in float32 from the same bfloat16 values,
    the result rounded back to bfloat16: what native bf16 hardware does (bf16 products are exact in
    float32, and sums accumulate in float32). On CPUs without native bf16, PyTorch's own bf16
    convolution is its reference kernel: 33 s instead of 0.8 s for BiRefNet lite at 256x256 here.
    A torch function mode is per thread, so other threads' computations are untouched."""

    FUNCTIONS = (F.conv2d, F.linear)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if func in self.FUNCTIONS and isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and x.is_cpu:
            def widen(value):
                return value.float() if isinstance(value, torch.Tensor) else value

            widened = func(*map(widen, args), **{name: widen(value) for name, value in kwargs.items()})
            return widened.to(torch.bfloat16)
        return func(*args, **kwargs)


def configure_torch(device: str | torch.device | None = "auto") -> None:
    """Process-wide settings for fixed-size inference, applied once by a front end at start-up:
    on NVIDIA GPUs cuDNN picks the fastest convolution for each shape once (every input is the
    same size), and float32 matmuls may use TF32, as the model card's
    `set_float32_matmul_precision('high')` does."""
    if pick_device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def int8_linear(network: nn.Module) -> nn.Module:
    """`network` (float32, on the CPU) with its Linear layers quantized to int8, in place: torch's dynamic
    quantization, whose kernels run on the CPU only."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(network, {nn.Linear}, dtype=torch.qint8, inplace=True)


def compiled_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled network is warmed up for: 1, 2, 4, ... below `max_batch`, and `max_batch`."""
    return tuple(2**i for i in range(max_batch.bit_length()) if 2**i < max_batch) + (max_batch,)


class TorchEngine:
    """A PyTorch network on one device: casts, pads for a compiled network, halves the batch
    when the device runs out of memory, and hands back CPU probabilities."""

    name = "torch"
    fixed_size = None
    input_size = None  # any size: the model's own unless asked

    def __init__(self, network: nn.Module, *, output_index: int = -1, activation: Activation = Activation.SIGMOID,
                 device="auto", dtype="auto", model_name: str | None = None):
        self.model_name = model_name
        self.torch_device = pick_device(device)
        self.device = str(self.torch_device)
        self.int8 = dtype == INT8
        if self.int8 and self.torch_device.type != "cpu":
            raise ValueError(f"--dtype int8 runs on the CPU only, not {self.device}; on a GPU float16 is the fast "
                             f"choice (the default)")
        self.dtype = pick_dtype(dtype, self.torch_device)
        self.network = network.to(device=self.torch_device, dtype=self.dtype).eval()
        if self.int8:
            self.network = int8_linear(self.network)
        # An explicit bfloat16 on a CPU without native bf16 (`auto` picks float32 there).
        self.float32_arithmetic = (self.dtype == torch.bfloat16 and self.torch_device.type == "cpu"
                                   and not cpu_has_fast_bfloat16())
        self.output_index = output_index
        self.activation = Activation(activation)
        self.compiled_batch_sizes: tuple[int, ...] = ()
        self.compile_seconds = 0.0

    def describe(self) -> str:
        dtype = "int8 Linear + float32" if self.int8 else str(self.dtype).replace("torch.", "")
        if self.float32_arithmetic:
            dtype += ", float32 arithmetic"
        compiled = ", compiled" if self.compiled_batch_sizes else ""
        return f"torch on {self.torch_device.type} ({dtype}{compiled})"

    def compile(self, backend: str, input_size: tuple[int, int], max_batch: int) -> None:
        """`torch.compile` with static shapes, then one warm-up pass per batch size the network
        will see (powers of two up to `max_batch`; batches are zero-padded up to the next one),
        so that no request pays for compilation."""
        if self.int8:
            raise ValueError("--compile and --dtype int8 do not go together (dynamically quantized layers do not "
                             "compile); choose one")
        started = time.perf_counter()
        self.network = torch.compile(self.network, backend=backend, dynamic=False)
        self.compiled_batch_sizes = compiled_batch_sizes(max_batch)
        for size in self.compiled_batch_sizes:
            self.forward(torch.zeros(size, 3, *input_size))
        self.compile_seconds = time.perf_counter() - started
        log.info("compiled (%s) for batches of %s in %.1f s", backend,
                 "/".join(map(str, self.compiled_batch_sizes)), self.compile_seconds)

    def padded(self, batch: torch.Tensor) -> torch.Tensor:
        """A compiled network's input zero-padded to the next batch size it was warmed up for.
        Always a new tensor made here, in inference mode: dynamo guards on that, so a padded
        batch must be the same kind of tensor as the warm-up's unpadded ones, or it recompiles."""
        size = next((s for s in self.compiled_batch_sizes if s >= len(batch)), len(batch))
        out = batch.new_zeros(size, *batch.shape[1:])
        out[:len(batch)] = batch
        return out

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """One network pass: (B, 3, H, W) CPU input -> (B, 1, h, w) float32 CPU probabilities."""
        network_input = batch.to(device=self.torch_device, dtype=self.dtype)
        if self.compiled_batch_sizes:
            network_input = self.padded(network_input)
        with Float32Arithmetic() if self.float32_arithmetic else contextlib.nullcontext():
            raw = self.network(network_input)[self.output_index][:len(batch)]
        return activate(raw, self.activation).cpu()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """`forward`, halving the batch when the device runs out of memory."""
        try:
            return self.forward(batch)
        except torch.OutOfMemoryError:
            if self.torch_device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise RuntimeError(f"out of memory on {self.device} for a single image at "
                                   f"{batch.shape[-1]}x{batch.shape[-2]}; try --device cpu, a smaller --size or "
                                   f"--dtype") from None
            half = len(batch) // 2
            log.warning("out of memory at batch %d on %s: retrying in halves", len(batch), self.device)
            return torch.cat([self(batch[:half]), self(batch[half:])])
