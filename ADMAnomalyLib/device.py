"""Compute-device selection and mixed-precision policy."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .config import PRECISIONS
from .errors import DeviceError

VECTOR_MATH_FUNCTIONS = ("abs", "acos", "asin", "atan", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1",
                         "log", "log10", "log1p", "log2", "rsqrt", "sigmoid", "sin", "sinh", "sqrt", "tan", "tanh")
"""Element-wise functions that PyTorch's CPU kernels may route to oneMKL's vector math (VML), each
settled once by :func:`settle_cpu_vector_math` (a superset: settling one needlessly costs nothing)."""


@functools.lru_cache(maxsize=None)
def settle_cpu_vector_math() -> None:
    """Call each of :data:`VECTOR_MATH_FUNCTIONS` once on one element, in float32 and float64, on this
    thread alone.

    oneMKL (2024.2, the build in the torch 2.13 CPU wheels) picks each VML function's kernel on its
    first call; when that first call runs on several intra-op threads at once, one thread can run a
    low-accuracy kernel on its whole chunk (pytorch/pytorch#188792). Measured here: the DR encoder's
    first tanh in a fresh process was off by up to 5e-5 on half of its elements in 5 of 40 processes,
    so the same case gave energies differing by up to 3e-4 between two runs of ``predict`` (2 of 12
    processes). A one-element call runs on the calling thread only and settles the choice before any
    concurrent use (after it: 0 of 80 and 0 of 24). Runs once, when this module is imported, which
    every engine path that computes does (inference, training, the study, the Slicer logic)."""
    for dtype in (torch.float32, torch.float64):
        value = torch.full((1,), 0.5, dtype=dtype)
        for name in VECTOR_MATH_FUNCTIONS:
            getattr(torch, name)(value)


settle_cpu_vector_math()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda' | 'cuda:N' to a usable device; a missing GPU is a DeviceError."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "gpu":
        name = "cuda"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but no CUDA GPU is available to PyTorch")
        try:
            resolved = torch.device(name)
        except RuntimeError:
            raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
        return resolved
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda")


def describe_device(device: torch.device) -> str:
    """Human-readable name of a device, e.g. for the Slicer panel."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    # Without AVX512-BF16 or AMX, CPU bf16 is emulated and slower than fp32.
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype of the CtoC network while training under one of :data:`PRECISIONS` (``None``
    means float32). 'auto' is bfloat16 where the device runs it natively (a GPU that supports it, a
    CPU with AVX512-BF16 or AMX), float32 elsewhere; float16 would need loss scaling, so it is refused."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16":
        raise ValueError("fp16 training is not supported (it needs loss scaling); use bf16 or fp32")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_native_bf16()
    return torch.bfloat16 if native else None


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype for the CtoC network at inference under 'auto' | 'fp32' | 'bf16' | 'fp16'
    (``None`` means float32). 'auto' is half precision on a GPU (bf16 where supported, else fp16)
    and float32 on CPU, where results then do not depend on which vector units the CPU has."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool | torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast on the device: ``True`` means bfloat16, a dtype means that dtype; falsy is a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if enabled is True else enabled
    return torch.autocast(device_type=device.type, dtype=dtype)
