"""Generation spread over several devices or processes with PyTorch Lightning.

`trainer.predict` deals the sample indices out to the processes (the distributed sampler gives
rank r the indices r, r + world, ...; when the count does not divide evenly it repeats some to even
out the ranks). Each process generates its share as one batch with per-row parameters, the
results are gathered with `all_gather_object`, de-duplicated by index and put back in order.
With a count and no GPU, Lightning runs that many CPU processes (DDP over gloo).
"""

from __future__ import annotations

import logging
import math
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..models.loading import LoadedModel
from .samples import generate_texts


class _SampleGenerator(L.LightningModule):
    def __init__(self, loaded: LoadedModel, prompt: str | None, settings: list[dict[str, float]], top_k: int,
                 max_new_tokens: int, seed: int):
        super().__init__()
        self.model = loaded.model
        self.loaded = loaded
        self.prompt, self.settings, self.top_k = prompt, settings, top_k
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.local: list[tuple[int, str]] = []
        self.gathered: list[tuple[int, str]] = []

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[tuple[int, str]]:
        indices = batch.tolist()
        # Each rank draws from its own stream, so identical settings on two ranks give different samples.
        texts = generate_texts(self.loaded, self.prompt, [self.settings[i] for i in indices], self.top_k,
                               self.max_new_tokens, self.seed + 7919 * self.global_rank + batch_idx,
                               progress=self.global_rank == 0)
        self.local.extend(zip(indices, texts))
        return list(zip(indices, texts))

    def on_predict_epoch_end(self) -> None:
        parts: list[list[tuple[int, str]]] = [self.local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(parts, self.local)
        # The sampler pads uneven shares by repeating early indices: keep each index's first result.
        by_index: dict[int, str] = {}
        for part in parts:
            for index, text in part:
                by_index.setdefault(index, text)
        self.gathered = sorted(by_index.items())


def generate_on_devices(loaded: LoadedModel, request, prompt: str | None, settings: list[dict[str, float]],
                        top_k: int, max_new_tokens: int, seed: int, max_rows: int | None = None) -> list[str] | None:
    """Generate every sample once, spread over the requested devices; None in worker processes.

    Each process generates its share in batches of at most `max_rows` samples. Ctrl-C raises
    KeyboardInterrupt (Lightning itself would exit with status 1 after killing the workers).
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    devices = list(request.ids) if request.kind == "ids" else request.count
    module = _SampleGenerator(loaded, prompt, settings, top_k, max_new_tokens, seed)
    trainer = L.Trainer(
        accelerator="auto", devices=devices, strategy="ddp" if request.count > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    per_rank = math.ceil(len(settings) / trainer.world_size)
    loader = DataLoader(list(range(len(settings))), batch_size=min(per_rank, max_rows or per_rank), shuffle=False)
    try:
        trainer.predict(module, loader, return_predictions=False)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.global_rank != 0:
        return None
    indices = [index for index, _ in module.gathered]
    if indices != list(range(len(settings))):
        raise RuntimeError(f"multi-device generation returned samples {indices}, expected 0..{len(settings) - 1}")
    return [text for _, text in module.gathered]
