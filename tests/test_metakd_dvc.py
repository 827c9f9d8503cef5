"""The Meta-KD stages' DVC dependencies: which settings rerun which Meta-KD stage (nothing trained).

Uses the faked scratch pipeline of fakepipe.faked_lock (the `scratch` fixture) (every output a tiny file, dvc.lock committed).
"""

from __future__ import annotations

import pytest
import yaml
from fakepipe import REPO, family, repo_at, status_of

META = {"metakd_scores", "train_meta_teacher", "distill_metakd"}


def families(changed: set[str]) -> set[str]:
    return {family(s) for s in changed}


SEEDS = yaml.safe_load((REPO / "params.yaml").read_text())["seeds"]


@pytest.mark.slow
def test_metakd_stages_exist_for_every_task_and_seed(scratch):
    with repo_at(scratch) as repo:
        names = {s.addressing for s in repo.index.stages}
    for task in ("mnli", "amazon"):
        assert {f"metakd_scores@{task}", f"train_meta_teacher@{task}"} <= names
        assert {f"distill_metakd@{task}-{seed}" for seed in SEEDS} <= names
    assert not any(n.startswith("train_teacher@") and n.endswith("-meta") for n in names)


@pytest.mark.slow
def test_student_lr_reruns_the_metakd_students_only(scratch):
    changed = status_of(scratch, lr=5.0e-4)
    assert {f"distill_metakd@{t}-{s}" for t in ("mnli", "amazon") for s in SEEDS} <= changed
    assert not families(changed) & {"metakd_scores", "train_meta_teacher"}


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value", "expected"), [
    # `dvc status` names the stages whose own deps changed; the rest follow when their inputs do.
    # Each Meta-KD setting reaches the full-data stage and its few-shot twin (Figure 2).
    ("metakd.scores.variant", "code", {"metakd_scores", "metakd_scores_fewshot"}),
    ("metakd.scores.mask_padding", True, {"metakd_scores", "metakd_scores_fewshot"}),
    ("metakd.teacher.domain_loss_weight", 0.0, {"train_meta_teacher", "train_meta_teacher_fewshot"}),
    ("profiles.demo.meta_teacher.lr", 1.0e-4, {"train_meta_teacher", "train_meta_teacher_fewshot"}),
    ("metakd.distill.tkd_weight", 0.2, {"distill_metakd", "distill_fewshot_metakd"}),
    ("profiles.demo.metakd_stage_a.epochs", 4, {"distill_metakd", "distill_fewshot_metakd"}),
    ("profiles.demo.metakd_stage_b.epochs", 4, {"distill_metakd", "distill_fewshot_metakd"}),
    ("profiles.paper.metakd_stage_b.epochs", 4, set()),  # the inactive profile changes nothing
])
def test_each_metakd_setting_invalidates_exactly_its_stage(scratch, key, value, expected):
    assert families(status_of(scratch, **{key: value})) == expected


@pytest.mark.slow
def test_other_teachers_do_not_rerun_metakd(scratch):
    changed = status_of(scratch, **{"profiles.demo.teacher.lr": 1.0e-4, "distill.gamma": 0.5})
    assert not families(changed) & META
