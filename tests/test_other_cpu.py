"""notebooks/conftest.py: the notebooks' kernels compute as another CPU would, and nbval compares decimals to one unit.

Both halves are attacked through real nbval runs. A stored output that prints more digits than are
stable across CPUs (executed here on the CPU's own path, stored, then re-executed by nbval under
the conftest) fails with nbval's mismatch report; without the conftest the same twin passes (the
control: the failure is the lower path's); printed at a stable precision it passes. A stored
decimal one unit off passes nbval, three units off or changed text fails; property tests check the
rule itself: never two units, another format, a changed integer or changed text.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("notebooks_conftest", NOTEBOOKS / "conftest.py")
notebooks_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebooks_conftest)
other_cpu_environment = notebooks_conftest.other_cpu_environment

lower_path = pytest.mark.skipif(not other_cpu_environment(), reason="this CPU has no lower instruction set to compare against")

# A float32 softmax over a vocabulary (its exp and its sum follow the vector width), a float32
# matrix product (MKL's kernel) and a bfloat16 one (oneDNN's rounding): the kinds of digit that
# differed between our machines.
COMPUTE = """
import torch
torch.manual_seed(0)
logits = 4 * torch.randn(8, 50257)
x, w32 = torch.randn(8, 576), torch.randn(576, 4096)
h, w = torch.randn(8, 768).bfloat16(), torch.randn(768, 3072).bfloat16()
"""
PRINT_ALL_DIGITS = ('print(f"{torch.softmax(logits, -1).pow(2).sum().item():.9g} {(x @ w32).sum().item():.9g} '
                    '{(h @ w).float().sum().item():.9g}")')
PRINT_STABLE_DIGITS = ('print(f"{torch.softmax(logits, -1).pow(2).sum().item():.3f} {(x @ w32).sum().item():.2e} '
                       '{(h @ w).float().sum().item():.2e}")')
MISMATCH = "mismatch 'stdout'"  # nbval's report of a changed printed output


def notebook(code: str, stored: str | None = None) -> dict:
    """A one-cell notebook whose stored output is `stored`, or else `code`'s output on this CPU's own path."""
    if stored is None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, {})
        stored = out.getvalue()
    return {
        "cells": [{"cell_type": "code", "execution_count": 1, "id": "twin", "metadata": {},
                   "outputs": [{"name": "stdout", "output_type": "stream", "text": stored}],
                   "source": code}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def run_nbval(folder: Path, nb: dict, with_conftest: bool = True) -> subprocess.CompletedProcess:
    """nbval on `nb` in `folder`, under notebooks/conftest.py or (the control) without it."""
    if with_conftest:
        shutil.copy(NOTEBOOKS / "conftest.py", folder / "conftest.py")
    (folder / "twin.ipynb").write_text(json.dumps(nb))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
         "--rootdir", str(folder), str(folder / "twin.ipynb")],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )


@lower_path
def test_the_lower_path_is_the_one_the_kernels_get():
    env = other_cpu_environment()
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    native = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    lower = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**os.environ, **env}).stdout
    assert native != lower, (native, lower)


@lower_path
def test_a_cpu_decided_digit_fails_nbval(tmp_path):
    result = run_nbval(tmp_path, notebook(COMPUTE + PRINT_ALL_DIGITS))
    assert result.returncode != 0 and "1 failed" in result.stdout and MISMATCH in result.stdout, result.stdout[-2000:]


@lower_path
def test_the_same_digits_pass_on_the_cpus_own_path(tmp_path):
    """The control: without the conftest the all-digits twin passes, so the failure above is the lower path's."""
    result = run_nbval(tmp_path, notebook(COMPUTE + PRINT_ALL_DIGITS), with_conftest=False)
    assert result.returncode == 0, result.stdout[-2000:]


@lower_path
def test_digits_stable_across_cpus_pass_nbval(tmp_path):
    result = run_nbval(tmp_path, notebook(COMPUTE + PRINT_STABLE_DIGITS))
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.parametrize(("stored", "passes"), [("p = 0.5132\n", True), ("p = 0.5130\n", True),
                                                 ("p = 0.5134\n", False), ("q = 0.5131\n", False)])
def test_nbval_compares_decimals_to_one_unit(tmp_path, stored, passes):
    """The comparison nbval really runs under the conftest (not only the function): one unit passes, three do not."""
    result = run_nbval(tmp_path, notebook('print(f"p = {0.5131:.4f}")', stored=stored))
    assert (result.returncode == 0) is passes, result.stdout[-2000:]


same_to_one_unit = notebooks_conftest.same_to_one_unit
fixed_point = st.builds(lambda value, places: f"{value:.{places}f}", st.floats(-1e6, 1e6), st.integers(1, 6))


def shifted(text: str, units: int) -> str:
    """A fixed-point decimal moved by `units` in its last digit, printed with as many decimals."""
    value = Decimal(text)
    places = -value.as_tuple().exponent
    return f"{value + units * Decimal(1).scaleb(-places):.{places}f}"


@given(fixed_point, st.integers(-1, 1))
def test_a_decimal_one_unit_off_compares_equal(text, units):
    assert same_to_one_unit(f"p = {text} nats", f"p = {shifted(text, units)} nats")


@given(fixed_point, st.integers(2, 50), st.sampled_from([-1, 1]))
def test_a_decimal_two_units_off_does_not(text, units, sign):
    assert not same_to_one_unit(f"p = {text} nats", f"p = {shifted(text, sign * units)} nats")


@pytest.mark.parametrize(("reference", "computed", "equal"), [
    ("eps 1.19e-07", "eps 1.20e-07", True),
    ("eps 1.19e-07", "eps 1.21e-07", False),
    ("eps 1.19e-07", "eps 1.2e-07", False),  # another format
    ("0.0000", "-0.0001", True),
    ("id 260 at 18 of 19", "id 261 at 18 of 19", False),  # integers compare exactly
    ("0.5131 ' the'", "0.5131 ' a'", False),  # text compares exactly
    ("0.50", "0.5", False),
])
def test_formats_integers_and_text(reference, computed, equal):
    assert same_to_one_unit(reference, computed) is equal
