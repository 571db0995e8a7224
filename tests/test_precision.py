"""thoracic_seg/precision.py: the one precision policy (dtype per device, gradient scaler, channels-last, autocast)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from thoracic_seg import precision
from thoracic_seg.precision import FLOAT32, Precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16_CL = Precision(torch.bfloat16, grad_scaler=False, channels_last=True)
FP16_SCALED_CL = Precision(torch.float16, grad_scaler=True, channels_last=True)
FP32_CL = Precision(None, grad_scaler=False, channels_last=True)


@pytest.fixture
def hardware(monkeypatch):
    """Set what the policy sees: ``hardware(cuda_bf16=..., cpu_bf16=...)`` (no GPU needed)."""
    def set_hardware(*, cuda_bf16: bool = False, cpu_bf16: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda_bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla T4")
        monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: cpu_bf16)
    return set_hardware


# --------------------------------------------------------------------------------------------
# The policy per phase: (device, hardware, request) -> Precision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, cuda_bf16, cpu_bf16, amp, expected", [
    (CUDA, True, False, None, BF16_CL),          # A100, H100: bfloat16, no scaler
    (CUDA, True, False, True, BF16_CL),
    (CUDA, True, False, False, FP32_CL),
    (CUDA, False, False, None, FP16_SCALED_CL),  # T4, V100: float16 + GradScaler
    (CUDA, False, False, True, FP16_SCALED_CL),
    (CUDA, False, False, False, FP32_CL),
    (CPU, False, True, None, BF16_CL),           # native bfloat16 (AVX512-BF16, AMX)
    (CPU, False, False, None, FP32_CL),          # emulated bfloat16 would be slower
    (CPU, False, False, True, BF16_CL),          # asked for
    (CPU, False, True, False, FP32_CL),
])
def test_training_precision(hardware, device, cuda_bf16, cpu_bf16, amp, expected):
    hardware(cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)
    assert precision.training_precision(device, amp) == expected


def test_training_channels_last_on_cpu_is_a_setting(hardware, monkeypatch):
    hardware(cuda_bf16=True)
    monkeypatch.setattr(precision, "CHANNELS_LAST_ON_CPU", False)
    assert precision.training_precision(CPU, False) == FLOAT32
    assert precision.training_precision(CUDA, False) == FP32_CL


@pytest.mark.parametrize("device, cuda_bf16, cpu_bf16, request_, expected", [
    (CPU, False, True, "auto", BF16_CL),
    (CPU, False, False, "auto", FLOAT32),
    (CPU, False, False, "bfloat16", BF16_CL),  # asked for: emulated, but honoured
    (CPU, False, True, "float32", FLOAT32),
    (CUDA, True, False, "auto", BF16_CL),
    (CUDA, True, False, "float32", FLOAT32),
    (CUDA, False, False, "auto", FLOAT32),
    (CUDA, False, True, "auto", FLOAT32),      # the CPU's instructions do not matter on a GPU
])
def test_prediction_precision(hardware, device, cuda_bf16, cpu_bf16, request_, expected):
    hardware(cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)
    assert precision.prediction_precision(request_, device) == expected


def test_prediction_defaults_to_float32():
    assert precision.DEFAULT_PREDICTION_PRECISION == "float32"
    assert precision.PREDICTION_PRECISIONS == ("auto", "float32", "bfloat16")


@pytest.mark.parametrize("device, request_, message", [
    (CPU, "half", "precision must be one of auto, float32, bfloat16, got 'half'"),
    (CUDA, "float16", "precision must be one of auto, float32, bfloat16, got 'float16'"),
    (CUDA, "bfloat16", "--precision bfloat16: the GPU Tesla T4 has no bfloat16"),
])
def test_prediction_precision_refuses(hardware, device, request_, message):
    hardware(cuda_bf16=False)
    with pytest.raises(ValueError, match=message):
        precision.prediction_precision(request_, device)


# --------------------------------------------------------------------------------------------
# The CPU bfloat16 detector: oneDNN, then torch's probes, then /proc/cpuinfo flags
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mkldnn, avx512_bf16, amx_tile, flags, expected", [
    (True, True, False, set(), True),
    (True, False, True, set(), True),
    (True, False, False, {"avx2", "avx512f"}, False),
    (True, False, False, {"avx2", "amx_bf16"}, True),     # probes say no, the flags say yes
    (True, False, False, {"avx512f", "avx512_bf16"}, True),
    (True, None, None, {"avx512_bf16"}, True),            # a torch without the probes
    (True, None, None, set(), False),
    (False, True, True, {"avx512_bf16"}, False),          # no oneDNN: bfloat16 is not native
])
def test_cpu_has_native_bfloat16(monkeypatch, mkldnn, avx512_bf16, amx_tile, flags, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    for probe, answer in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx_tile)):
        if answer is None:
            monkeypatch.delattr(torch.cpu, probe, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, probe, lambda answer=answer: answer, raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert precision.cpu_has_native_bfloat16() is expected


def test_cpu_flags_come_from_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    real_path = precision.Path
    monkeypatch.setattr(precision, "Path", lambda name: cpuinfo if name == "/proc/cpuinfo" else real_path(name))
    assert precision._cpu_flags() == {"fpu", "avx2", "avx512_bf16"}
    cpuinfo.unlink()
    assert precision._cpu_flags() == set()


# --------------------------------------------------------------------------------------------
# What a Precision gives its callers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, dtype, name, memory_format", [
    (FLOAT32, torch.float32, "float32", torch.contiguous_format),
    (FP32_CL, torch.float32, "float32", torch.channels_last),
    (BF16_CL, torch.bfloat16, "bfloat16", torch.channels_last),
    (FP16_SCALED_CL, torch.float16, "float16", torch.channels_last),
])
def test_precision_properties(policy, dtype, name, memory_format):
    assert (policy.dtype, policy.name, policy.memory_format) == (dtype, name, memory_format)


def test_float32_runs_without_autocast():
    context = FLOAT32.autocast(CPU)
    assert isinstance(context, contextlib.nullcontext)
    conv = torch.nn.Conv2d(1, 2, kernel_size=1)
    with context:
        assert not torch.is_autocast_enabled("cpu")
        assert conv(torch.ones(1, 1, 2, 2)).dtype == torch.float32


def test_bfloat16_autocast_on_the_policy_device():
    conv = torch.nn.Conv2d(1, 2, kernel_size=1)
    with BF16_CL.autocast(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert conv(torch.ones(1, 1, 2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_exact_float32_switches_tf32_off_on_cuda_and_restores_it():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        precision.use_fast_cuda_kernels()                     # what training leaves in the process
        with precision.exact_float32(torch.device("cuda")):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        with precision.exact_float32(torch.device("cpu")):   # nothing to do on a CPU
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_a_gpu_that_only_emulates_bfloat16_trains_float16_with_a_scaler(monkeypatch):
    """A T4 (compute capability 7.5): torch.cuda.is_bf16_supported() says yes by emulation; the
    policy must take float16 with a gradient scaler there, and predict in float32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla T4")
    assert precision.training_precision(CUDA) == FP16_SCALED_CL
    assert precision.prediction_precision("auto", CUDA) == FLOAT32
    with pytest.raises(ValueError, match="the GPU Tesla T4 has no bfloat16"):
        precision.prediction_precision("bfloat16", CUDA)
