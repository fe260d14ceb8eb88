"""What machine and software a measurement was taken on."""
from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from typing import Any

import numpy
import torch

__all__ = ["cpu_description", "cpu_flags", "saturating_int8", "gpu_description", "latprune_version", "environment"]

_SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd")


@lru_cache(maxsize=1)
def cpu_description() -> str:
    """'CPU model [flags]', e.g. 'AMD EPYC 7B13 [avx2]'; used as the device in table fingerprints."""
    model, flags = platform.processor() or platform.machine(), cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
    except OSError:
        pass
    simd = [f for f in _SIMD_FLAGS if f in flags]
    return f"{model} [{' '.join(simd)}]" if simd else model


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(val.split())
    except OSError:
        pass
    return frozenset()


def saturating_int8() -> bool:
    """Whether this is an x86 CPU whose int8 dot products can saturate: AVX2 or AVX-512F without
    VNNI (``vpmaddubsw`` adds two u8 x s8 products in int16). VNNI (AVX-512 or AVX) and AMX
    accumulate in int32, and ARM is not affected."""
    f = cpu_flags()
    return "avx2" in f and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & f)


def gpu_description() -> str:
    """'GPU name (driver D, CUDA C, sm_XY)': the device in a GPU table's fingerprint."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    driver = "unknown"
    try:  # the kernel module's version line: "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15 ..."
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
        driver = next((w for w in words if w[:1].isdigit() and "." in w), driver)
    except OSError:
        pass
    return f"{props.name} (driver {driver}, CUDA {torch.version.cuda}, sm_{props.major}{props.minor})"


def latprune_version() -> str:
    try:
        from importlib.metadata import version

        return version("latprune")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every run and every figure."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("onnx", "onnxruntime", "torch_pruning", "torchvision", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken install: record as absent
            env[mod] = None
    env["latprune"] = latprune_version()
    return env
