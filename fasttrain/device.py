"""Device, precision, torch.compile, and MFU: model FLOP/s over the device's peak."""
from __future__ import annotations

import contextlib

import torch

# Dense (not 2:4-sparse) bf16 tensor-core peaks in FLOP/s from the vendors' datasheets, matched on the device
# name, first match wins. MFU divides by these, as llm.c, Megatron-LM and PaLM report it; mfu_fields adds
# the ratio to a matmul measured on the device as a second column.
_PEAK_BF16 = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
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


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to dtype (None: none). cache=False for a step a CUDA graph captures (no cached casts)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def compiled(fn, mode: str | None):
    """torch.compile(fn) in `mode` (see config.COMPILE_MODES); None or "off": fn itself."""
    if mode in (None, "off"):
        return fn
    return torch.compile(fn) if mode == "default" else torch.compile(fn, mode=mode)


_MEASURED_MATMUL = {}


def measured_matmul_flops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """bf16 matmul rate (n x n x n) actually achieved on this GPU (FLOP/s), measured once per process."""
    device = torch.device(device)
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device(), n)
    if key in _MEASURED_MATMUL:
        return _MEASURED_MATMUL[key]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    _MEASURED_MATMUL[key] = 2 * n**3 * iters / (start.elapsed_time(end) / 1e3)
    return _MEASURED_MATMUL[key]


def peak_flops(device: torch.device) -> float | None:
    """Datasheet dense bf16 peak FLOP/s of the GPU in use, by name; None on CPUs and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16:
        if key in name:
            return flops
    return None


def mfu_fields(flops_per_s: float, peak: float | None, matmul: float | None) -> dict:
    """The MFU columns for an achieved model FLOP/s: {"mfu": over the datasheet peak, "mfu_vs_matmul": over
    the measured matmul rate}; peak and matmul are for all devices of the run together, a None one is left out."""
    fields = {}
    if peak:
        fields["mfu"] = flops_per_s / peak
    if matmul:
        fields["mfu_vs_matmul"] = flops_per_s / matmul
    return fields
