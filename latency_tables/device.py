"""What machine and software a measurement was taken on."""
from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from typing import Any

_SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd")


@lru_cache(maxsize=1)
def cpu_description() -> str:
    """'CPU model [flags]', e.g. 'AMD EPYC 7B13 [avx2]'; used as the device in table fingerprints."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    simd = [f for f in _SIMD_FLAGS if f in flags]
    return f"{model} [{' '.join(simd)}]" if simd else model


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every run and every figure."""
    import numpy
    import torch

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
    try:
        from importlib.metadata import version

        env["latprune"] = version("latprune")
    except Exception:
        env["latprune"] = None
    return env
