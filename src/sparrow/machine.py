"""What a results file says about the machine that produced it."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vector_isa() -> str:
    """'AVX-512' or 'AVX2' (what the native attention kernels need, or fall back without)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "AVX-512" if " avx512f" in flags else ("AVX2" if " avx2" in flags else "no AVX2")


def machine_info(device: str | torch.device = "cpu") -> dict:
    device = str(device)
    info = {
        "cpu": cpu_name(),
        "cpu_isa": cpu_vector_isa(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_device(info: dict) -> str:
    """One line: 'NVIDIA H100 ...' or 'AMD EPYC CPU, 2 threads'."""
    if "gpu" in info:
        return info["gpu"]
    isa = f", {info['cpu_isa']}" if info.get("cpu_isa") else ""
    return f"{info['cpu']} CPU{isa}, {info['torch_threads']} threads"
