"""Length-grouped training schedules (Schedule.group_by_length, TrainSettings.group_by_length).

Grouping may change which rows share a step and in what order the steps come, never which rows an
epoch holds or how many steps it has; and off it must be the ungrouped schedule to the last index,
or every existing run's numbers would move.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import DOMAINS, toy_task
from pydantic import ValidationError

from hrkd.config import StudentSettings, TrainSettings, parse_params
from hrkd.data.loading import Schedule
from hrkd.distill.runs import StudentPlan
from hrkd.distill.teacher_models import teacher_checkpoints
from hrkd.engine import Runtime
from hrkd.errors import HRKDError
from hrkd.teachers import TeacherPlan

REPO = Path(__file__).resolve().parents[1]

KINDS = ["single", "mix", "mtl", "parallel"]
SIZES = (400, 150, 250)  # parallel: the 150- and 250-row domains cycle


def uniform_lengths(sizes=SIZES, seed=0, longest=128) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, longest + 1, (n,), generator=g, dtype=torch.int32) for n in sizes)


def listed(steps) -> list[list[tuple[int, list[int]]]]:
    return [[(d, idx.tolist()) for d, idx in step] for step in steps]


def rows(steps) -> list[tuple[int, int]]:
    return sorted((d, int(i)) for step in steps for d, idx in step for i in idx)


def widths(step, lengths) -> list[int]:
    """Longest row of each domain's group in a step; collate pads the step to the largest."""
    return [int(lengths[d][idx].max()) for d, idx in step]


def padded_tokens(steps, lengths) -> int:
    """What collate feeds the model in an epoch: every step is width x rows."""
    return sum(max(widths(step, lengths)) * sum(len(idx) for _, idx in step) for step in steps)


def schedule(kind, group=0, lengths=None, batch_size=8, seed=3, sizes=SIZES) -> Schedule:
    return Schedule(kind, sizes, batch_size, seed=seed, domain=2, lengths=lengths, group_by_length=group)


# Recorded from the schedule before grouping existed (torch 2.13's randperm, as constraints.txt
# pins): sizes (5, 3, 4), batch 2, seed 7, domain 0 for single, epoch 1.
UNGROUPED = {
    "single": [[(0, [3, 0])], [(0, [2, 4])], [(0, [1])]],
    "mix": [[(0, [2]), (2, [0])], [(0, [0]), (2, [1])], [(1, [0, 1])], [(0, [4]), (1, [2])], [(2, [2, 3])],
            [(0, [3, 1])]],
    "mtl": [[(2, [1, 0])], [(0, [2, 1])], [(0, [4])], [(0, [3, 0])], [(1, [0, 2])], [(1, [1])], [(2, [2, 3])]],
    "parallel": [[(0, [3, 4]), (1, [0, 2]), (2, [3, 1])], [(0, [1, 0]), (1, [1, 1]), (2, [0, 2])],
                 [(0, [2, 0]), (1, [0, 2]), (2, [3, 0])]],
}


@pytest.mark.parametrize("kind", KINDS)
def test_off_is_the_ungrouped_schedule_index_for_index(kind):
    lengths = uniform_lengths((5, 3, 4))
    for sched in (Schedule(kind, (5, 3, 4), 2, seed=7),
                  Schedule(kind, (5, 3, 4), 2, seed=7, lengths=lengths, group_by_length=0)):
        assert listed(sched.epoch(1)) == UNGROUPED[kind]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [1, 3, 50])  # 50 x 8 rows is more than any domain: one megabatch
def test_grouping_keeps_the_epochs_rows_and_steps(kind, group):
    lengths = uniform_lengths()
    plain, grouped = schedule(kind), schedule(kind, group, lengths)
    assert grouped.steps_per_epoch == plain.steps_per_epoch
    for epoch in (0, 1):
        before, after = plain.epoch(epoch), grouped.epoch(epoch)
        assert len(after) == len(before) == plain.steps_per_epoch
        assert rows(after) == rows(before)
        assert sorted(sum(len(idx) for _, idx in step) for step in after) == \
            sorted(sum(len(idx) for _, idx in step) for step in before)
        if kind in ("single", "mtl"):
            assert all(len(step) == 1 for step in after)
        if kind == "parallel":  # still one full batch of every domain per step
            assert all([(d, len(idx)) for d, idx in step] == [(0, 8), (1, 8), (2, 8)] for step in after)
        if kind != "parallel":  # each row once per epoch (parallel cycles its smaller domains)
            assert len(set(rows(after))) == sum(SIZES if kind != "single" else SIZES[2:])


def test_parallel_leaves_a_domain_smaller_than_a_batch_whole_in_every_step():
    sizes = (40, 5)
    lengths = uniform_lengths(sizes)
    for step in schedule("parallel", 4, lengths, sizes=sizes).epoch(0):
        assert sorted(step[1][1].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_schedule_is_a_function_of_seed_and_epoch(kind):
    lengths = uniform_lengths()
    first = listed(schedule(kind, 4, lengths).epoch(2))
    assert listed(schedule(kind, 4, uniform_lengths()).epoch(2)) == first  # rebuilt: a resumed run
    assert listed(schedule(kind, 4, lengths, seed=4).epoch(2)) != first
    assert listed(schedule(kind, 4, lengths).epoch(3)) != first


@pytest.mark.parametrize("kind", KINDS)
def test_grouping_cuts_padding(kind):
    # Lengths uniform on 1..128, mean 64.5. Ungrouped, a step is about as wide as its longest row
    # of 8 (or 24) random ones, ~115-127: about half of what collate feeds is padding. Grouped, a
    # sorted megabatch of 8 batches hands each batch about an eighth of the range (~16 tokens), so
    # a step is ~8 wider than its rows' mean and ~60 % of the ungrouped tokens remain. Measured:
    # 0.65 / 0.63 / 0.64 / 0.63 (single / mix / mtl / parallel).
    lengths = uniform_lengths()
    before = padded_tokens(schedule(kind).epoch(0), lengths)
    after = padded_tokens(schedule(kind, 8, lengths).epoch(0), lengths)
    assert after <= 0.75 * before


def test_parallel_steps_pair_batches_of_similar_length_across_domains():
    # A step is padded to its widest domain, so grouping pays in parallel only if the k-th batches
    # of all domains come from the same slice of their sorted megabatches. Ungrouped or shuffled
    # apart, the three widths are ~3 independent draws over 1..128 (mean spread in the tens); in
    # step they fall within one ~16-token slice (measured: 9.5 grouped, 21.7 ungrouped).
    lengths = uniform_lengths()
    spread = [max(w) - min(w) for w in (widths(step, lengths) for step in schedule("parallel", 8, lengths).epoch(0))]
    assert sum(spread) / len(spread) < 14


@pytest.mark.parametrize("kind", ["single", "parallel"])
def test_grouped_batches_still_come_in_random_order(kind):
    # group 50 x 8 rows: every domain is one megabatch, sorted longest first; unshuffled, the
    # steps would run from the longest batch down to the shortest.
    lengths = uniform_lengths()
    steps = schedule(kind, 50, lengths).epoch(0)
    w = [max(widths(step, lengths)) for step in steps]
    assert w != sorted(w, reverse=True) and w != sorted(w)
    assert min(w[: len(w) // 4]) < max(w[-len(w) // 4 :])  # not even roughly longest first


def test_grouping_needs_lengths_that_match_the_sizes():
    lengths = uniform_lengths()
    bad = [
        (dict(kind="parallel", group=4), "lengths=task.lengths"),
        (dict(kind="mix", group=4, lengths=lengths[:2]),
         r"\[400, 150\] rows per domain but sizes are \[400, 150, 250\]"),
        (dict(kind="single", group=4, lengths=(lengths[0], lengths[1], lengths[2][:-1])), "rows per domain"),
        (dict(kind="mtl", group=-1, lengths=lengths), "use 0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(HRKDError, match=message) as err:
            schedule(**kwargs)
        assert "\n" not in str(err.value)
    schedule("parallel", 0)  # off: no lengths needed


def test_train_setting_defaults_off_and_rejects_negatives():
    assert TrainSettings().group_by_length == 0
    assert TrainSettings(group_by_length=50).group_by_length == 50
    with pytest.raises(ValidationError):
        TrainSettings(group_by_length=-1)


# -- the three places that build a training schedule pass the run's setting and the train lengths --


@pytest.fixture
def recorded(monkeypatch):
    made: list[Schedule] = []

    def recording(*args, **kwargs) -> Schedule:
        made.append(Schedule(*args, **kwargs))
        return made[-1]

    for module in ("hrkd.teachers", "hrkd.distill.runs", "hrkd.metakd.distill"):
        monkeypatch.setattr(f"{module}.Schedule", recording)
    return made


def wiring_params():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["engine"].update(device="cpu", progress=False)
    return parse_params(raw)


def assert_train_lengths(sched: Schedule, task) -> None:
    assert [t.tolist() for t in sched.lengths] == [task.splits[d]["train"].lengths.tolist() for d in task.domains]


def test_teacher_and_student_runs_schedule_with_their_settings(kd_world, recorded):
    task, runtime = toy_task(), Runtime(device=torch.device("cpu"))
    teacher = TeacherPlan("hrkd", task, wiring_params(), kd_world["student"], runtime,
                          TrainSettings(batch_size=4, group_by_length=3), kd_world["tok"])
    next(teacher.runs(None))
    checkpoints = teacher_checkpoints(kd_world["teachers"], "toy", "hrkd", DOMAINS, "per-domain")
    student = StudentPlan("hrkd", "hrkd", task, wiring_params(), 1, checkpoints, kd_world["student"],
                          kd_world["tok"], runtime, StudentSettings(batch_size=4, group_by_length=5))
    next(student.runs(None))
    assert [(s.kind, s.group_by_length) for s in recorded] == [("parallel", 3), ("parallel", 5)]
    for sched in recorded:
        assert_train_lengths(sched, task)
        sched.epoch(0)


def test_metakd_stages_schedule_with_their_own_settings(recorded, monkeypatch, tmp_path):
    # Only the schedules are under test: the meta-teacher, the objectives and stage A's training
    # are stood in for.
    import hrkd.metakd.distill as metakd

    monkeypatch.setattr(metakd, "load_meta_teacher", lambda *a, **k: None)
    monkeypatch.setattr(metakd.MultiDomainBert, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(metakd, "MetaDistillObjective", lambda *a, **k: SimpleNamespace(load_snapshot=None))
    monkeypatch.setattr(metakd, "_stage_a", lambda *a, **k: None)
    task = toy_task()
    plan = metakd.MetaKDPlan(task, wiring_params(), 1, {d: tmp_path for d in DOMAINS}, tmp_path,
                             Runtime(device=torch.device("cpu")), [torch.ones(n) for n in task.sizes("train")],
                             TrainSettings(batch_size=4, group_by_length=2), TrainSettings(batch_size=4, group_by_length=7))
    assert plan.two_stage  # params.yaml's Meta-KD schedule: stage A, then stage B
    next(plan.runs(None))
    assert [(s.kind, s.domain, s.group_by_length) for s in recorded] == [("single", 0, 2), ("single", 0, 7)]
    for sched in recorded:
        assert_train_lengths(sched, task)
