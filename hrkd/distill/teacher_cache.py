"""The frozen teachers' outputs of every training row, computed once and reused by later epochs.

Distillation teachers are frozen and run in eval mode, so a row's embeddings, tapped hidden
states, attention scores and logits are the same every epoch: recomputing them costs a third
of a CPU distillation step on the small profile's models (benchmarks/bench_distill.py). The
cache keeps them per (domain, row) at the width they were computed with. Positions past a row's
length (padding) depend only on their position, not on the batch's width (padded keys are
masked), so a step with rows not seen yet runs the teachers once at the cache's full width
(``max_seq_len``) and every later batch holding those rows, whatever its width, reads a slice.

Values agree with a fresh forward to float rounding (the batch a row is computed in changes the
matmul blocking, not the maths). ``engine.teacher_cache_gib`` bounds the memory; a run whose
cache would not fit recomputes every step, as without a cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

log = logging.getLogger("hrkd.distill")

__all__ = ["CachedView", "TeacherCache", "TeacherView"]


class TeacherView(Protocol):
    """One domain's rows of a teacher forward, as the losses read them."""

    @property
    def embeddings(self) -> Tensor: ...

    def hidden(self, layer: int) -> Tensor: ...

    def scores(self, layer: int) -> Tensor: ...

    @property
    def logits(self) -> Tensor: ...


@dataclass(frozen=True)
class CachedView:
    """A :class:`TeacherView` gathered from the cache for one step's rows of one domain."""

    embeddings: Tensor
    hidden_by_layer: dict[int, Tensor]
    scores_by_layer: dict[int, Tensor]
    logits: Tensor

    def hidden(self, layer: int) -> Tensor:
        return self.hidden_by_layer[layer]

    def scores(self, layer: int) -> Tensor:
        return self.scores_by_layer[layer]


class _DomainStore:
    # Each tensor keeps the dtype the teacher produced it in (under autocast: bf16 scores and
    # logits, fp32 layer-norm outputs), so a cached step reads exactly what a fresh one would.
    def __init__(self, rows: int, width: int, layers: Sequence[int], heads: int, view: TeacherView) -> None:
        def like(t: Tensor, *shape: int) -> Tensor:
            return torch.zeros(rows, *shape, dtype=t.dtype, device=t.device)

        hidden = view.embeddings.shape[-1]
        self.embeddings = like(view.embeddings, width, hidden)
        self.hidden = {n: like(view.hidden(n), width, hidden) for n in layers}
        self.scores = {n: like(view.scores(n), heads, width, width) for n in layers}
        self.logits = like(view.logits, view.logits.shape[-1])
        self.filled = torch.zeros(rows, dtype=torch.bool)  # host side: checking it needs no device sync


class TeacherCache:
    """Per-domain stores for the training rows of one run; filled lazily by :meth:`put`.

    ``sizes[d]``: training rows of the objective's local domain d; ``width``: the longest row
    (``max_seq_len``); ``layers``: the 1-based teacher layers whose hidden states and scores
    the losses read; ``heads``: the teacher's attention heads (the other shapes come from the
    first outputs stored).
    """

    def __init__(self, sizes: Sequence[int], width: int, layers: Sequence[int], heads: int) -> None:
        self.sizes = tuple(int(n) for n in sizes)
        self.width = int(width)
        self.layers = tuple(int(n) for n in layers)
        self.heads = int(heads)
        self._stores: list[_DomainStore | None] = [None] * len(self.sizes)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def bytes_needed(sizes: Sequence[int], width: int, layers: int, heads: int, hidden: int, labels: int,
                     itemsize: int = 4) -> int:
        """Memory of a full cache (fp32 by default: an upper bound under autocast)."""
        per_row = width * hidden * (1 + layers) + layers * heads * width * width + labels
        return int(sum(sizes)) * per_row * itemsize

    def get(self, rows: Sequence[Tensor], width: int) -> list[CachedView] | None:
        """Every domain's cached outputs for ``rows``, ``width`` wide, or None if any row is new."""
        if width > self.width or len(rows) != len(self.sizes):
            return None
        if any(store is None or not bool(store.filled[idx].all())
               for store, idx in zip(self._stores, rows)):
            self.misses += 1
            return None
        self.hits += 1
        return self.read(rows, width)

    def read(self, rows: Sequence[Tensor], width: int) -> list[CachedView]:
        views = []
        for store, idx in zip(self._stores, rows):
            assert store is not None
            at = idx.to(store.logits.device)
            views.append(CachedView(
                embeddings=store.embeddings[at, :width],
                hidden_by_layer={n: h[at, :width] for n, h in store.hidden.items()},
                scores_by_layer={n: s[at, :, :width, :width] for n, s in store.scores.items()},
                logits=store.logits[at],
            ))
        return views

    def put(self, rows: Sequence[Tensor], views: Sequence[TeacherView]) -> None:
        """Keep a step's outputs, computed at the cache's full width (``views[d]`` holds ``rows[d]``)."""
        for d, (idx, view) in enumerate(zip(rows, views)):
            if view.embeddings.shape[1] != self.width:
                raise ValueError(f"cache rows are {self.width} wide, got teacher outputs {view.embeddings.shape[1]} wide")
            store = self._stores[d]
            if store is None:
                store = self._stores[d] = _DomainStore(self.sizes[d], self.width, self.layers, self.heads, view)
            at = idx.to(store.logits.device)
            store.embeddings[at] = view.embeddings
            for n in self.layers:
                store.hidden[n][at] = view.hidden(n)
                store.scores[n][at] = view.scores(n)
            store.logits[at] = view.logits
            store.filled[idx] = True
