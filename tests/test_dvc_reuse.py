"""Finished stages are reused, never retrained: the run-cache, a second clone, the queue recipe and
the compare step of the README, on this project's dvc.yaml with fake commands (tests/fakepipe.py).

Each test asserts on which stages ran (the fakes log their names), not on timing. The grid is the
smallest with every stage kind (19 stages); the real commands' outputs are covered elsewhere.
"""

from __future__ import annotations

import json

import pytest

from fakepipe import STUDENT_FAMILIES, Log, build, clone, family, metrics_files, sh, wait_for_queue

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The pipeline committed without a dvc.lock (as a fresh clone of this repository is), then run."""
    root = tmp_path_factory.mktemp("reuse")
    log = Log(root / "ran.log")
    stages = build(root / "base", log.path)
    sh(root / "base", "dvc", "repro")
    assert sorted(log.new()) == sorted(stages)  # a first run runs everything, once
    return {"root": root, "repo": root / "base", "log": log, "stages": stages,
            "cache": root / "base" / ".dvc" / "cache", "metrics": metrics_files(root / "base")}


def is_teacher(metrics_file: str) -> bool:
    return metrics_file.startswith("metrics/teachers/") or "/teacher-" in metrics_file


def students_and_report(stages):
    return {s for s in stages if family(s) in STUDENT_FAMILIES} | {"report"}


def test_every_stage_can_be_restored_from_the_run_cache(base):
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash

    import os

    cwd = os.getcwd()
    os.chdir(base["repo"])
    try:
        with Repo(base["repo"]) as repo:
            # data.dvc is a frozen import: it never runs, so the run-cache has nothing to restore.
            refused = [s.addressing for s in repo.index.stages if not s.frozen and not _can_hash(s)]
    finally:
        os.chdir(cwd)
    assert not refused, f"DVC's run-cache is off for {refused} (a persist or non-local output)"


def test_a_second_clone_and_another_machine_have_nothing_to_reproduce(base):
    """A clone sharing the cache (`dvc cache dir`) restores every stage from the run-cache; a
    machine with its own cache does the same from a DVC remote (`dvc push --run-cache`, then
    `dvc repro --pull`). Neither needs a committed dvc.lock."""
    repo = clone(base["repo"], base["root"] / "shared-cache", cache=base["cache"])
    out = sh(repo, "dvc", "repro")
    assert base["log"].new() == [], out
    assert out.count("is cached - skipping run") == len(base["stages"])
    assert metrics_files(repo) == base["metrics"]
    assert "up to date" in sh(repo, "dvc", "status", "dvc.yaml")
    remote = base["root"] / "remote"
    sh(base["repo"], "dvc", "remote", "add", "--local", "-d", "store", str(remote))
    sh(base["repo"], "dvc", "push", "--run-cache")  # outputs and run-cache entries
    other = clone(base["repo"], base["root"] / "other-machine")
    sh(other, "dvc", "remote", "add", "--local", "-d", "store", str(remote))
    out = sh(other, "dvc", "repro", "--pull")
    assert base["log"].new() == [], out
    assert metrics_files(other) == base["metrics"]
    assert "up to date" in sh(other, "dvc", "status", "dvc.yaml")


def test_readme_variant_sequence_compares_and_the_original_lr_comes_back_from_the_cache(base):
    """README: `dvc repro`, `dvc exp save -n baseline dvc.yaml`, `dvc exp run -n <v> -S lr=...`, compare;
    then the original lr again restores the original outputs without training."""
    repo = clone(base["repo"], base["root"] / "variant", cache=base["cache"])
    sh(repo, "dvc", "repro")
    # Without the dvc.yaml target DVC re-hashes data.dvc's import from its URL and fails offline.
    sh(repo, "dvc", "exp", "save", "-n", "baseline", "dvc.yaml")
    assert base["log"].new() == []
    sh(repo, "dvc", "exp", "run", "-n", "lr5e-4", "-S", "lr=5.0e-4")
    assert set(base["log"].new()) == students_and_report(base["stages"])
    changed = metrics_files(repo)
    assert all(changed[k] == base["metrics"][k] for k in changed if is_teacher(k))
    assert all(changed[k] != base["metrics"][k] for k in changed if not is_teacher(k))

    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "baseline", "lr5e-4", "--all", "--json", stdout_only=True))
    moved = {path for path, values in diff.items() if any(v.get("diff") for v in values.values())}
    assert any(p.startswith("metrics/students/") for p in moved) and "reports/summary.json" in moved
    teacher_rows = [p for p in diff if p.startswith("metrics/teachers/")]
    assert teacher_rows and not set(teacher_rows) & moved  # shown beside the students, unchanged
    assert all(v["old"] is not None for values in diff.values() for v in values.values())  # a real baseline
    plots = json.loads(sh(repo, "dvc", "plots", "diff", "baseline", "lr5e-4", "--json", stdout_only=True))
    drawn = {rev for entry in plots["data"]["student training loss"] for rev in entry.get("revisions", [])}
    assert drawn == {"baseline", "lr5e-4"}, drawn

    out = sh(repo, "dvc", "exp", "run", "-S", "lr=null")  # params.yaml's original value
    assert base["log"].new() == [], out  # everything back from the run-cache, nothing trained
    assert metrics_files(repo) == base["metrics"]


def test_queue_recipe_reruns_only_students_and_report(base):
    """README "Experiments": commit the finished pipeline, queue a variant, apply it."""
    repo = clone(base["repo"], base["root"] / "queue", cache=base["cache"])
    sh(repo, "dvc", "repro")  # the finished grid of the README's recipe, restored not retrained
    assert base["log"].new() == []
    sh(repo, "git", "add", "dvc.lock", "params.yaml")
    sh(repo, "git", "commit", "-qm", "paper profile")
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "lr3e-3", "-S", "lr=3.0e-3")
    sh(repo, "dvc", "queue", "start", "-j", "1")
    status = wait_for_queue(repo)
    assert "Success" in status, status
    assert set(base["log"].new()) == students_and_report(base["stages"])
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json", stdout_only=True))
    variant = [r for rev in shown for e in (rev.get("experiments") or []) for r in e["revs"] if r["name"] == "lr3e-3"]
    assert variant and variant[0]["data"]["params"]["params.yaml"]["data"]["lr"] == 3.0e-3
    assert variant[0]["data"]["metrics"], "dvc exp show lists the variant's metrics"
    sh(repo, "dvc", "exp", "apply", "lr3e-3")
    applied = metrics_files(repo)
    assert all(applied[k] == base["metrics"][k] for k in applied if is_teacher(k))
    assert all(applied[k] != base["metrics"][k] for k in applied if not is_teacher(k))
    assert base["log"].new() == []  # apply checks out, it never runs a stage
    assert "up to date" in sh(repo, "dvc", "status", "dvc.yaml")  # and leaves a consistent workspace
