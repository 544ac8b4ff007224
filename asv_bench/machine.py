"""Describe this machine to asv, so that results from CPU and GPU runs are kept apart.

    python asv_bench/machine.py            # prints and registers e.g. "cpu-2core" or "gpu-h100"

The machine name says what was measured: the GPU model on CUDA machines (the benchmarks run
there on the GPU), the core count on CPU-only ones. Pass ``--machine NAME`` to asv afterwards.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys


def describe() -> dict[str, str]:
    import torch

    info = {
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "num_cpu": str(os.cpu_count()),
        "cpu": platform.processor() or "unknown",
    }
    try:
        with open("/proc/meminfo") as f:
            info["ram"] = f.readline().split(":")[1].strip()
        with open("/proc/cpuinfo") as f:
            models = [line.split(":")[1].strip() for line in f if line.startswith("model name")]
            if models:
                info["cpu"] = models[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        short = re.search(r"(H100|H200|A100|L40S?|L4|A10G?|V100|T4|RTX ?\w+)", gpu)
        info["machine"] = "gpu-" + (short.group(1).replace(" ", "").lower() if short else "cuda")
        info["cpu"] = f"{info['cpu']} + {gpu} (torch {torch.__version__})"
    else:
        info["machine"] = f"cpu-{os.cpu_count()}core"
    return info


def main() -> int:
    info = describe()
    args = [sys.executable, "-m", "asv", "machine", "--yes"] + [f"--{key}={value}" for key, value in info.items()]
    subprocess.run(args, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    print(info["machine"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
