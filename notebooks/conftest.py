"""nbval re-executes the notebooks on another CPU's arithmetic, so that no stored output keeps a digit the CPU decides.

A stored notebook output is compared digit for digit. The last digits of a float sum, and most
digits of bfloat16 arithmetic, depend on which instructions the CPU has and which kernels its
libraries pick for it: a notebook executed on an Intel Xeon without bfloat16 instructions printed
0.568 where an AMD EPYC with them printed 0.587. The notebooks are executed on the author's CPU as
it is; the kernels nbval starts here compute as an AVX2 machine does (PyTorch's own kernels through
`ATEN_CPU_CAPABILITY`, oneDNN's through `ONEDNN_MAX_CPU_ISA`, MKL's float32 matrix products
through `MKL_ENABLE_INSTRUCTIONS`), and see no GPU. On an AVX-512 machine their float32 logits then
move in the fifth decimal and bfloat16 logits by about 0.2, as on another machine, and an output
that prints such a digit fails here rather than on a learner's CPU. On a machine without AVX-512
the kernels run as they are (the pytest header says so) and this check is blind. The unit tests
run on the CPU as it is.

A value that lies near a rounding boundary may still round either way on another CPU, however few
digits are printed. So nbval compares a decimal number (one written with a point) to one unit in
its last digit: 0.5131 matches 0.5130 and 0.5132, not 0.5133, nor 0.513 (another format). All
other text, integers included (token ids, counts), must match exactly.

Texts that notebooks 04, 06 and 08 cache on disk are keyed by the code, not by the CPU: where they
are cached, nbval re-checks what is computed from them; a fresh machine generates them anew.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal

import pytest
import torch
from nbval.plugin import IPyNbCell

DECIMAL = re.compile(r"-?\d+\.\d+(?:[eE][+-]?\d+)?")


def same_to_one_unit(reference: str, computed: str) -> bool:
    """Whether two texts are equal but for decimals that differ by at most one unit in their (shared) last digit."""
    if DECIMAL.split(reference) != DECIMAL.split(computed):
        return False
    for ref, new in zip(DECIMAL.findall(reference), DECIMAL.findall(computed)):
        ref_value, new_value = Decimal(ref), Decimal(new)
        exponent = ref_value.as_tuple().exponent
        if new_value.as_tuple().exponent != exponent or abs(ref_value - new_value) > Decimal(1).scaleb(exponent):
            return False
    return True


class ToOneUnit(str):
    """A stored or computed output text that compares equal under `same_to_one_unit`."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and same_to_one_unit(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:  # texts that compare equal hash equal: only their non-decimal parts count
        return hash(tuple(DECIMAL.split(self)))


_nbval_sanitize = IPyNbCell.sanitize


def _sanitize_to_one_unit(cell: IPyNbCell, text):
    """nbval compares the sanitized texts with `!=`: make that comparison `same_to_one_unit`."""
    text = _nbval_sanitize(cell, text)
    return ToOneUnit(text) if isinstance(text, str) else text


IPyNbCell.sanitize = _sanitize_to_one_unit


# The path every AVX-512 machine is checked on: AVX2, the level below it, for each library that picks kernels.
AVX2_PATH = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def other_cpu_environment() -> dict[str, str]:
    """Environment variables that make a new Python process compute as an AVX2 CPU does, where this one is above it."""
    return dict(AVX2_PATH) if torch.backends.cpu.get_cpu_capability() == "AVX512" else {}


def pytest_report_header(config: pytest.Config) -> str:
    env = other_cpu_environment()
    native = torch.backends.cpu.get_cpu_capability()
    if not env:
        return f"notebooks: kernels run on this CPU's own path ({native}); no lower path to compare against here"
    return f"notebooks: kernels run below this CPU's {native}, with no GPU: " + " ".join(
        f"{key}={value}" for key, value in env.items())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """Start each notebook's kernel (nbval does it in the first cell's setup) with the lower instruction set."""
    saved = dict(os.environ)
    os.environ.update(other_cpu_environment(), CUDA_VISIBLE_DEVICES="")  # a learner's GPU would print "cuda"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
