"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine() -> dict[str, Any]:
    """Platform, CPU count, torch threads, library versions, load average and GPU (if any)."""
    import torch

    from mpq.files import versions

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "versions": versions(),
                            "cuda": torch.cuda.is_available()}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
