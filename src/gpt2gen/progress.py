"""Progress bars: off for a short step whose bar would be noise (and vary in notebook outputs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def progress_bars_off(library: str = "transformers") -> Iterator[None]:
    """Turn `library`'s progress bars ("transformers" or "datasets") off for the block, then back as they were."""
    if library == "transformers":
        from transformers.utils import logging

        enabled, disable, enable = logging.is_progress_bar_enabled, logging.disable_progress_bar, logging.enable_progress_bar
    elif library == "datasets":
        import datasets

        enabled = datasets.utils.logging.is_progress_bar_enabled
        disable, enable = datasets.disable_progress_bars, datasets.enable_progress_bars
    else:
        raise ValueError(f"library must be 'transformers' or 'datasets', got {library!r}")
    was_enabled = enabled()
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()
