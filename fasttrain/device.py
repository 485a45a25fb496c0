"""Device, precision, torch.compile and the device's peak FLOP rate (for MFU)."""
from __future__ import annotations

import contextlib

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched on the device name.
# MFU is only reported where the device is known; `peak_flops(measure=True)` measures a matmul instead.
_PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible: use train.device=cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. bf16 by default on GPUs: no loss scaling needed."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("this GPU has no bf16 support: use train.precision=fp32")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compiled(fn, mode: str | None):
    """torch.compile(fn) in `mode` (see config.COMPILE_MODES); None or "off": fn itself."""
    if mode in (None, "off"):
        return fn
    return torch.compile(fn) if mode == "default" else torch.compile(fn, mode=mode)


def measured_matmul_flops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """bf16 matmul rate actually achieved on this device (FLOP/s)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3)


def peak_flops(device: torch.device, measure: bool = False) -> float | None:
    """Peak bf16 FLOP/s of the device in use: datasheet by name, or measured. None on CPUs."""
    if device.type != "cuda":
        return None
    if measure:
        return measured_matmul_flops(device)
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16:
        if key in name:
            return flops
    return None
