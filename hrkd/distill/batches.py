"""Distillation batches: a collated step plus where each domain's rows are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from hrkd.data.loading import Batch, Step, TaskSplits, collate
from hrkd.errors import HRKDError


@dataclass(frozen=True)
class DistillBatch:
    """A training step for :class:`KDObjective`.

    ``batch.domain_ids`` are the objective's *local* domain indices (0..D-1) and ``spans[d]`` is
    the [start, stop) row range of local domain d. Ranges are host ints worked out from the
    schedule step, so slicing a domain's rows is a view with no device-to-host sync.
    """

    batch: Batch
    spans: tuple[tuple[int, int], ...]
    # rows[d]: domain d's row indices in its split (host tensor), for the teacher cache; () when
    # the batch was not built from a schedule step.
    rows: tuple[Tensor, ...] = ()


def make_distill_batch(task: TaskSplits, split: str, step: Step, domains: Sequence[int],
                       device: torch.device | None = None) -> DistillBatch:
    """Collate a schedule step (after :func:`~hrkd.data.loading.shard`) for an objective over ``domains``.

    ``domains`` are task domain indices in the objective's order; every one must appear exactly
    once in the step with at least one row (multi-domain KD sums over all D domains each step).
    """
    local = {d: i for i, d in enumerate(domains)}
    spans: list[tuple[int, int] | None] = [None] * len(domains)
    rows: list[Tensor | None] = [None] * len(domains)
    ids: list[Tensor] = []
    start = 0
    for d, idx in step:
        if d not in local or spans[local[d]] is not None:
            raise ValueError(f"step has rows of domain {d} that the objective over {list(domains)} does not expect")
        n = len(idx)
        spans[local[d]] = (start, start + n)
        rows[local[d]] = idx
        ids.append(torch.full((n,), local[d], dtype=torch.long))
        start += n
    empty = [task.domains[domains[i]] for i, s in enumerate(spans) if s is None or s[0] == s[1]]
    if empty:
        raise HRKDError(
            f"a training step has no rows of domain(s) {empty} on this process: every step must see every domain; "
            "lower engine.nproc or raise the student batch_size"
        )
    batch = collate(task, split, step)
    batch = Batch(batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.labels, torch.cat(ids))
    if device is not None:
        batch = batch.to(device)
    return DistillBatch(batch=batch, spans=tuple(spans), rows=tuple(rows))  # type: ignore[arg-type]


def _padded(db: DistillBatch, width: int) -> DistillBatch:
    """The same rows padded to ``width`` positions (padding is masked, so real positions are unchanged)."""
    b = db.batch

    def pad(t: Tensor) -> Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]))

    return DistillBatch(Batch(pad(b.input_ids), pad(b.attention_mask), pad(b.token_type_ids), b.labels, b.domain_ids),
                        db.spans, db.rows)


def concat_domain_batches(batches: Sequence[Batch]) -> DistillBatch:
    """One batch per domain -> a :class:`DistillBatch` padded to their common width (as in training)."""
    if not batches or any(len(b) == 0 for b in batches):
        raise HRKDError("need a non-empty batch of examples for every domain; pass at least one row per domain")
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: Tensor) -> Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]))

    spans, start = [], 0
    for b in batches:
        spans.append((start, start + len(b)))
        start += len(b)
    device = batches[0].input_ids.device
    batch = Batch(
        torch.cat([pad(b.input_ids) for b in batches]),
        torch.cat([pad(b.attention_mask) for b in batches]),
        torch.cat([pad(b.token_type_ids) for b in batches]),
        torch.cat([b.labels for b in batches]),
        torch.cat([torch.full((len(b),), d, dtype=torch.long, device=device) for d, b in enumerate(batches)]),
    )
    return DistillBatch(batch=batch, spans=tuple(spans))

