"""nbval re-executes the notebooks on another CPU's arithmetic, so that no stored output keeps a digit the CPU decides.

A stored notebook output is compared digit for digit. The last digits of a float sum, and most
digits of bfloat16 arithmetic, depend on which instructions the CPU has: a notebook executed on an
Intel Xeon without bfloat16 instructions printed 0.568 where an AMD EPYC with them printed 0.587.
The notebooks are executed on the author's CPU as it is; the kernels nbval starts here run one
instruction set lower (PyTorch's own kernels through `ATEN_CPU_CAPABILITY`, oneDNN's matrix
products and bfloat16 paths through `ONEDNN_MAX_CPU_ISA`). Their float32 logits then move in the
fifth decimal and bfloat16 logits by about 0.2, as on another machine, and any output that prints
such a digit fails here rather than on a learner's CPU. The unit tests run on the CPU as it is.

A value that lies near a rounding boundary may still round either way on another CPU, however few
digits are printed. So nbval compares a decimal number (one written with a point) to one unit in
its last digit: 0.5131 matches 0.5130 and 0.5132, not 0.5133, nor 0.513 (another format). All
other text, integers included (token ids, counts), must match exactly.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal

import pytest
import torch
from nbval.plugin import IPyNbCell

# PyTorch's capability as it reports it -> the environment that runs one instruction set lower.
ONE_LEVEL_LOWER = {
    "AVX512": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


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

    __hash__ = str.__hash__


_nbval_sanitize = IPyNbCell.sanitize


def _sanitize_to_one_unit(cell: IPyNbCell, text):
    """nbval compares the sanitized texts with `!=`: make that comparison `same_to_one_unit`."""
    text = _nbval_sanitize(cell, text)
    return ToOneUnit(text) if isinstance(text, str) else text


IPyNbCell.sanitize = _sanitize_to_one_unit


def other_cpu_environment() -> dict[str, str]:
    """Environment variables that make a new Python process compute as a CPU one instruction set lower."""
    return ONE_LEVEL_LOWER.get(torch.backends.cpu.get_cpu_capability(), {})


def pytest_report_header(config: pytest.Config) -> str:
    env = other_cpu_environment()
    native = torch.backends.cpu.get_cpu_capability()
    if not env:
        return f"notebooks: kernels run on this CPU's own path ({native}); no lower path to compare against here"
    return f"notebooks: kernels run one instruction set below this CPU's {native}: " + " ".join(
        f"{key}={value}" for key, value in env.items())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """Start each notebook's kernel (nbval does it in the first cell's setup) with the lower instruction set."""
    saved = dict(os.environ)
    os.environ.update(other_cpu_environment())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
