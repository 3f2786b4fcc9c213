"""Broken assembled models: dsv3ref's Transformer (harness.adapters.model) with one mistake."""

from __future__ import annotations

import torch

from dsv3ref.model import ModelCache, Transformer
from harness.adapters.model import ReferenceModel


class CacheNeverRead(ReferenceModel):
    """Each chunk given with a cache attends only to itself (a fresh cache per call): decoding forgets the prompt."""

    def forward(self, model: Transformer, tokens: torch.Tensor, cache: ModelCache | None = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None:
            cache = model.new_cache(tokens.shape[0], tokens.shape[1])
        return super().forward(model, tokens, cache, seqlens)


def cache_never_read() -> CacheNeverRead:
    return CacheNeverRead("absorbed", "auto")
