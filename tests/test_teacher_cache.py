"""The teacher-output cache: the same losses as a fresh teacher forward, no teacher forward on a hit."""

from __future__ import annotations

import pytest
import torch

from hrkd.data.loading import Schedule
from hrkd.distill.batches import make_distill_batch
from hrkd.distill.teacher_cache import TeacherCache
from helpers import build, toy_task


def _count_teacher_forwards(obj) -> list[int]:
    calls = [0]
    for g in obj.teachers:
        g.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _epochs(task, obj, domains, epochs):
    sched = Schedule("parallel" if len(domains) > 1 else "single", tuple(task.sizes("train")), 4, seed=1,
                     domain=domains[0])
    out = []
    for e in range(epochs):
        for step in sched.epoch(e):
            db = make_distill_batch(task, "train", step, domains)
            loss, logs = obj(db)
            out.append((float(loss.detach()), {k: float(v.detach()) for k, v in logs.items()}))
    return out, sched.steps_per_epoch


@pytest.mark.parametrize("method", ["multi-domain-kd", "hrkd", "tinybert-kd"])
def test_cached_losses_equal_fresh_ones_and_later_epochs_skip_the_teachers(kd_world, method):
    task = toy_task()
    domains = (0, 1) if method != "tinybert-kd" else (0,)
    fresh = build(kd_world, method)
    cached = build(kd_world, method)
    sizes = [task.sizes("train")[d] for d in domains]
    assert cached.enable_teacher_cache(sizes, width=8, budget_gib=1.0)
    calls = _count_teacher_forwards(cached)
    want, per_epoch = _epochs(task, fresh, domains, 3)
    got, _ = _epochs(task, cached, domains, 3)
    for (lw, logw), (lg, logg) in zip(want, got):
        assert lg == pytest.approx(lw, rel=1e-5, abs=1e-6)
        assert logg == pytest.approx(logw, rel=1e-5, abs=1e-6)
    # Epoch 1 fills the cache (one forward per teacher group and step); epochs 2-3 never run a teacher.
    assert calls[0] == per_epoch * len(cached.teachers)
    assert cached.teacher_cache.hits == 2 * per_epoch


def test_new_rows_run_the_teachers_once_at_full_width_then_any_width_hits(kd_world):
    task = toy_task()
    obj = build(kd_world, "multi-domain-kd")
    obj.enable_teacher_cache(task.sizes("train"), width=8, budget_gib=1.0)
    calls = _count_teacher_forwards(obj)
    widths = []
    for g in obj.teachers:
        g.model.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    step = [(0, torch.tensor([0, 1])), (1, torch.tensor([0, 1]))]
    db = make_distill_batch(task, "train", step, (0, 1))
    narrow = type(db.batch)(*(t[:, :3] for t in (db.batch.input_ids, db.batch.attention_mask,
                                                  db.batch.token_type_ids)), db.batch.labels, db.batch.domain_ids)
    obj(type(db)(narrow, db.spans, db.rows))  # first sight: teachers run 8 wide, not 3
    assert calls[0] == 2 and widths == [8, 8]
    obj(type(db)(narrow, db.spans, db.rows))
    obj(db)
    assert calls[0] == 2 and obj.teacher_cache.hits == 2 and obj.teacher_cache.misses == 1
    obj(make_distill_batch(task, "train", [(0, torch.tensor([1, 2])), (1, torch.tensor([0]))], (0, 1)))
    assert calls[0] == 4  # row 2 of domain 0 is new: the step runs the teachers again


def test_budget_too_small_keeps_the_cache_off(kd_world):
    obj = build(kd_world, "multi-domain-kd")
    need = TeacherCache.bytes_needed([10, 7], 8, layers=2, heads=4, hidden=48, labels=2)
    # By hand: per row 8*48*(1+2) embeddings+hidden, 2*4*8*8 scores, 2 logits; fp32.
    assert need == 17 * (8 * 48 * 3 + 2 * 4 * 64 + 2) * 4
    assert not obj.enable_teacher_cache([10, 7], 8, budget_gib=0.9 * need / 2**30)
    assert obj.teacher_cache is None
    assert not obj.enable_teacher_cache([10, 7], 8, budget_gib=0.0)
    assert obj.enable_teacher_cache([10, 7], 8, budget_gib=1.1 * need / 2**30)
