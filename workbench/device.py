"""Device and precision choices for training and evaluation (CPU, CUDA, bf16 autocast)."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one (a container's
    cpuset, `taskset`, a test worker pinned to one core), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device that exists here (ValueError otherwise)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products.
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10", "AMX", "ALL")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (oneDNN), so autocast pays off.

    NOTE: the probes read CPUID, so a oneDNN capped below bf16 (ONEDNN_MAX_CPU_ISA=AVX2, e.g.
    to reproduce an AVX2-only machine) is checked apart: bf16 is emulated there, many times slower.
    """
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and not cap.startswith(ONEDNN_BF16_ISAS):
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:
            pass
    return False


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """-> the autocast dtype (torch.bfloat16) or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
