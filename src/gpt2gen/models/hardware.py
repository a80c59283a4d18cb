"""Which processor computed a figure: its name, PyTorch's kernel level on it, and its bfloat16 instructions.

bfloat16 arithmetic, and the last digits of float sums, differ from one CPU to another: a figure
that depends on them is reported with the machine that computed it.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# Instructions that multiply bfloat16 numbers natively; without them PyTorch widens to float32 first.
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.exists() else []


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    names = [line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def bfloat16_instructions() -> list[str] | None:
    """The native bfloat16 instructions this CPU has, or None where /proc/cpuinfo cannot tell."""
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), None)
    return None if flags is None else [flag for flag in BFLOAT16_FLAGS if flag in flags]


def cpu_description() -> str:
    """One line naming the CPU, the instruction set PyTorch's kernels use on it, and its bfloat16 instructions."""
    bf16 = bfloat16_instructions()
    bf16_text = "unknown" if bf16 is None else ", ".join(bf16) or "none"
    return f"{cpu_name()} (PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}; bfloat16 instructions: {bf16_text})"
