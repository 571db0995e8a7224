"""The precision policy: which dtype on which device, when channels-last, and the autocast context.

Training, evaluation, prediction and the benchmarks all ask this module; none decides for itself.
At the defaults (``amp``/``--precision``), per device (prediction_precision: evaluation too):

| function             | CUDA with bf16 | CUDA, no bf16 (T4) | CPU, native bf16 | other CPU |
|----------------------|----------------|--------------------|------------------|-----------|
| training_precision   | bfloat16       | float16 + scaler   | bfloat16         | float32   |
| prediction_precision | float32        | float32            | float32          | float32   |

    policy = training_precision(torch.device("cuda"), amp=None)   # Precision(bfloat16, ...)
    with policy.autocast(device):
        logits = model(image.contiguous(memory_format=policy.memory_format))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from typing import Iterator

import torch

#: ``--precision`` of prediction: ``auto`` = bfloat16 where it is native, else float32.
PREDICTION_PRECISIONS = ("auto", "float32", "bfloat16")
#: float32: bfloat16 changed the labels of a real CT (:func:`prediction_precision`).
DEFAULT_PREDICTION_PRECISION = "float32"
#: Training uses channels-last on CPU too (measured 1.3x faster there, :func:`training_precision`).
CHANNELS_LAST_ON_CPU = True
#: /proc/cpuinfo flags of the CPU instructions that run bfloat16 natively.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: torch probes of the same instructions (private torch.cpu functions; absent in some versions).
_CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


@dataclass(frozen=True)
class Precision:
    """How a network runs on a device.

    Attributes:
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` for autocast, None for float32
            throughout (no autocast).
        grad_scaler: the loss needs a ``GradScaler`` (float16 gradients underflow; bfloat16 do not).
        channels_last: the model and its (N, C, H, W) inputs use ``torch.channels_last``.
    """

    autocast_dtype: torch.dtype | None = None
    grad_scaler: bool = False
    channels_last: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the autocast dtype, or ``torch.float32``."""
        return self.autocast_dtype or torch.float32

    @property
    def name(self) -> str:
        """``"bfloat16"``, ``"float16"`` or ``"float32"`` (for logs and reports)."""
        return str(self.dtype).replace("torch.", "")

    @property
    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` or ``torch.contiguous_format``, for models and 4-D inputs."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """``torch.autocast`` on ``device``'s type in :attr:`autocast_dtype`; a null context in float32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


#: float32 throughout, default memory layout (the benchmarks' reference setting).
FLOAT32 = Precision()


def _cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo; empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bfloat16() -> bool:
    """True when this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX) with oneDNN.

    Without those instructions bfloat16 is emulated and slower than float32. False when torch
    has no oneDNN (mkldnn); else True when a torch probe (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``) says so, or, for torch versions without the probes or where they
    say no, when /proc/cpuinfo lists ``avx512_bf16`` or ``amx_bf16``.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    for probe in _CPU_BF16_PROBES:
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return bool(set(CPU_BF16_FLAGS) & _cpu_flags())


def cuda_has_native_bfloat16() -> bool:
    """The current GPU computes bfloat16 (compute capability 8.0, Ampere, and newer). Not
    ``torch.cuda.is_bf16_supported()`` alone: it also says yes where bfloat16 is only emulated (a
    T4 or V100, where it is slow and cuDNN has no bfloat16 convolutions)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def training_precision(device: torch.device, amp: bool | None = None) -> Precision:
    """The training policy of a device (table in the module docstring); always channels-last.

    ``amp``: None = mixed precision where it is fast (every CUDA GPU; a CPU with native
    bfloat16: measured 1.5x faster than float32, same Dice; emulated elsewhere, slower), True = on
    (bfloat16 on any CPU), False = float32. On CUDA, bfloat16 where supported (Ampere and newer),
    else float16 with a gradient scaler (T4, V100). Channels-last feeds tensor cores on CUDA and was
    measured 1.3x faster on CPU too (oneDNN; base 16, 128 px, batch 8, AVX-512 EPYC: 47 -> 62 slices/s).
    """
    channels_last = device.type == "cuda" or CHANNELS_LAST_ON_CPU
    if amp is False:
        return Precision(None, False, channels_last)
    if device.type == "cuda":
        if cuda_has_native_bfloat16():
            return Precision(torch.bfloat16, False, channels_last)
        return Precision(torch.float16, True, channels_last)
    use_bf16 = amp if amp is not None else cpu_has_native_bfloat16()
    return Precision(torch.bfloat16 if use_bf16 else None, False, channels_last)


def use_fast_cuda_kernels() -> None:
    """Training's CUDA settings: TF32 in float32 matrix products and convolutions (Ampere and newer;
    a 10-bit mantissa inside them, as in the mixed-precision parts anyway) and cuDNN's autotuner
    (the input size is fixed). Evaluation and prediction run float32 under :func:`exact_float32`."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """Within the block, float32 matrix products and convolutions on CUDA are float32, not TF32
    (cuDNN allows TF32 by default, and training switches it on for the whole process): prediction's
    float32 means the labels of a float32 network. The previous settings come back afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def prediction_precision(precision: str, device: torch.device) -> Precision:
    """Prediction's and evaluation's ``--precision``: ``float32`` (the default), ``bfloat16``, or
    ``auto`` = bfloat16 where the device runs it natively, else float32. bfloat16 runs with
    channels-last tensors, float32 in the default layout. ``auto`` is 2.6x faster on a 2-core CPU
    but not the default: it changed labels of a CT the network never learnt (esophagus Dice 0.9778
    vs float32 on the real LUNG1-005; ``benchmarks/RESULTS.md``). ``ValueError``: an unknown precision,
    or ``bfloat16`` on a CUDA GPU without bfloat16 support.
    """
    if precision not in PREDICTION_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PREDICTION_PRECISIONS)}, got {precision!r}")
    if device.type == "cuda":
        fast = cuda_has_native_bfloat16()
        if precision == "bfloat16" and not fast:
            raise ValueError(f"--precision bfloat16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16")
    else:
        fast = cpu_has_native_bfloat16()
    bfloat16 = precision == "bfloat16" or (precision == "auto" and fast)
    return Precision(torch.bfloat16, False, True) if bfloat16 else FLOAT32


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` as
    given. ``ValueError`` naming the value when CUDA is asked for but absent (never a silent CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU; use --device cpu")
    return device
