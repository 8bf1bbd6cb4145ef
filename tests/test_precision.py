"""`precision=auto`: bf16 autocast only where the CPU runs bf16 natively, fp32 everywhere else.

On a CPU without AVX512-BF16/AMX, bf16 matmuls are emulated and many times slower than fp32,
so `auto` must never pick bf16 there. The CPU probes are mocked: these tests hold on any CPU.
"""
import pytest
import torch

from workbench import device
from workbench.device import cpu_has_native_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_probes(monkeypatch):
    """Set what the CPUID probes answer: cpu_probes(amx=..., avx512_bf16=...); a probe may raise."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def answer(value):
        def probe():
            if isinstance(value, Exception):
                raise value
            return value
        return probe

    def set_probes(amx=False, avx512_bf16=False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", answer(amx), raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", answer(avx512_bf16), raising=False)

    return set_probes


@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (False, False, None),                 # AVX2-only (or AVX-512 without BF16): fp32
    (False, True, torch.bfloat16),        # AVX512-BF16
    (True, False, torch.bfloat16),        # AMX
    (True, True, torch.bfloat16),
])
def test_auto_picks_bf16_exactly_where_it_is_native(cpu_probes, amx, avx512_bf16, expected):
    cpu_probes(amx=amx, avx512_bf16=avx512_bf16)
    assert cpu_has_native_bf16() is (expected is not None)
    assert resolve_precision("auto", CPU) is expected


def test_a_probe_that_fails_counts_as_not_native(cpu_probes):
    cpu_probes(amx=RuntimeError("no cpuinfo"), avx512_bf16=RuntimeError("no cpuinfo"))
    assert resolve_precision("auto", CPU) is None
    cpu_probes(amx=RuntimeError("no cpuinfo"), avx512_bf16=True)
    assert resolve_precision("auto", CPU) is torch.bfloat16


@pytest.mark.parametrize("cap,expected", [
    ("AVX2", None), ("avx512_core", None), ("AVX512_CORE_VNNI", None),
    ("AVX512_CORE_BF16", torch.bfloat16), ("AVX10_1_512_AMX", torch.bfloat16), ("ALL", torch.bfloat16),
])
def test_a_onednn_capped_below_bf16_is_not_native(cpu_probes, monkeypatch, cap, expected):
    """The probes read CPUID; ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2 machine reproduced on a bigger one)
    makes oneDNN emulate bf16, so `auto` must fall back to fp32."""
    cpu_probes(avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert resolve_precision("auto", CPU) is expected


def test_explicit_precisions_are_kept_whatever_the_cpu(cpu_probes):
    for amx, bf16 in ((False, False), (True, True)):
        cpu_probes(amx=amx, avx512_bf16=bf16)
        assert resolve_precision("fp32", CPU) is None
        assert resolve_precision("bf16", CPU) is torch.bfloat16


def test_the_probes_exist_in_this_torch():
    """Guards the mocks above: if torch renamed its probes, `auto` would silently become fp32 everywhere."""
    assert callable(getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    assert callable(getattr(torch.cpu, "_is_amx_tile_supported", None))
    assert device.ONEDNN_BF16_ISAS
